"""The shared yardstick: the eval config group at the end of a run and in
``python -m instruct.evaluate``, the same numbers both ways, the base model's cached row,
W&B, and inputs that are empty or wrong."""

from __future__ import annotations

import json
import math

import pytest

from instruct.config import compose
from instruct.evaluate import run_evaluation
from instruct.tracking import read_offline_run
from tests.conftest import run_module, toy_config

# eval=quick, cut to 5 prompts and 6 new tokens for the tiny model.
QUICK = ["eval=quick", "eval.ifeval.subset=5", "eval.max_new_tokens=6"]
FIGURES = ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")


def eval_config(checkpoint, *overrides):
    return compose([f"checkpoint={checkpoint}", *QUICK, *overrides], config_name="evaluate")


def rows(folder, label="tuned", suite="ifeval"):
    text = (folder / label / f"{suite}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def evaluated_run(toy_data, tmp_path_factory):
    """A run that ends with eval=quick, logged to offline W&B; (run dir, results). Fully
    tuned until it answers with a toy reply, so its replies differ from the base model's."""
    from instruct.train import train

    run_dir = tmp_path_factory.mktemp("evaluated")
    cfg = toy_config(toy_data, run_dir, "trainer.max_steps=24", "trainer.eval_every=12",
                     "trainer.samples=0", *QUICK)  # fmt: skip
    return run_dir, train(cfg)


@pytest.mark.slow
def test_a_run_ends_with_its_eval_on_the_best_checkpoint(evaluated_run):
    run_dir, results = evaluated_run
    saved = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert saved["eval"] == json.loads(json.dumps(results["eval"]))
    evaluation = results["eval"]
    assert evaluation["name"] == "quick" and evaluation["suites"] == ["ifeval"]
    assert evaluation["headline"]["metric"] == "ifeval/prompt_strict"
    for label in ("tuned", "base"):
        part = evaluation[label]["ifeval"]
        assert part["prompts"] == 5 and part["headline"] == "prompt_strict"
        for figure in FIGURES:
            score = part["scores"][figure]
            assert score["ci"][0] <= score["value"] <= score["ci"][1]
        assert len(rows(run_dir / "eval", label)) == 5
        per_prompt = json.loads((run_dir / "eval" / label / "ifeval.json").read_text())
        assert len(per_prompt["ids"]) == len(per_prompt["scores"]["prompt_strict"]["num"]) == 5
    assert results["val_fingerprint"] and len(results["val_fingerprint"]) == 64

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file, wait_seconds=60)
    summary = recorded["summary"]
    tuned = evaluation["tuned"]["ifeval"]["scores"]
    assert summary["eval/ifeval/prompt_strict"] == pytest.approx(tuned["prompt_strict"]["value"])
    assert summary["eval/ifeval/inst_loose_ci_high"] == pytest.approx(tuned["inst_loose"]["ci"][1])
    assert "eval/base/ifeval/prompt_strict" in summary
    (table,) = [r for r in recorded["history"] if r.get("eval/ifeval/_type") == "table-file"]
    assert table["eval/ifeval/nrows"] == 5


@pytest.mark.slow
def test_evaluate_gets_the_same_numbers_and_reads_the_base_from_its_cache(evaluated_run, caplog):
    run_dir, results = evaluated_run
    with caplog.at_level("INFO", logger="instruct.eval.runner"):
        summary = run_evaluation(eval_config(run_dir / "checkpoints" / "best", "logger=none"))
    assert "base model's scores read from the cache" in caplog.text
    out = run_dir / "eval-quick"
    for label in ("tuned", "base"):
        ours = summary["eval"][label]["ifeval"]["scores"]
        assert ours == results["eval"][label]["ifeval"]["scores"]
        replies = [r["reply"] for r in rows(out, label)]
        assert replies == [r["reply"] for r in rows(run_dir / "eval", label)]
        assert len(replies) == 5
    tuned = [r["reply"] for r in rows(out, "tuned")]
    assert tuned != [r["reply"] for r in rows(out, "base")]
    assert any(r.strip() for r in tuned)
    # The validation losses: the tuned one is training's best, the base one its start.
    assert summary["val_loss"]["tuned"] == pytest.approx(results["best_val_loss"], abs=1e-5)
    assert summary["val_loss"]["base"] == pytest.approx(results["initial_val_loss"], abs=1e-5)
    assert json.loads((out / "evaluation.json").read_text())["eval"]["headline"]


@pytest.mark.slow
def test_a_second_evaluation_never_overwrites_the_first(evaluated_run):
    run_dir, _ = evaluated_run
    best = run_dir / "checkpoints" / "best"
    run_evaluation(eval_config(best, "logger=none", "eval.base=false", "max_val_examples=0"))
    assert any((run_dir / name).is_dir() for name in ("eval-quick-2", "eval-quick-3"))
    taken = run_dir / "eval"
    with pytest.raises(FileExistsError, match="not empty"):
        run_evaluation(eval_config(best, f"out={taken}", "logger=none"))


@pytest.mark.slow
def test_empty_inputs_are_skipped_and_said(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    summary = run_evaluation(
        eval_config(
            run_dir / "checkpoints" / "best",
            "max_val_examples=0",
            "logger=none",
            f"eval.ifeval.path={empty}",
            f"out={tmp_path / 'o'}",
        )
    )
    assert summary["val_loss"] == {}
    assert "validation loss: max_val_examples=0" in summary["skipped"]
    part = summary["eval"]["tuned"]["ifeval"]
    assert part["prompts"] == 0 and part["info"]["skipped"]
    assert math.isnan(part["scores"]["prompt_strict"]["value"])


def test_tokenising_no_conversations_gives_no_features(tokenizer):
    from instruct.data.tokenize import prepare

    features, stats = prepare([], tokenizer, 64)
    assert features == [] and stats.examples == stats.kept == 0


def test_an_unknown_suite_fails_before_training(toy_data, tmp_path):
    from instruct.train import train

    cfg = toy_config(toy_data, tmp_path / "run", "logger=none", "eval=quick",
                     "eval.suites=[ifevl]")  # fmt: skip
    with pytest.raises(ValueError, match=r"eval.suites: unknown suite 'ifevl'.*ifeval"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_bad_eval_numbers_name_their_key(lora_toy):
    run_dir, _ = lora_toy
    with pytest.raises(ValueError, match=r"eval.confidence must be in \(0, 1\), got 1.5"):
        run_evaluation(eval_config(run_dir / "checkpoints" / "best", "eval.confidence=1.5"))


@pytest.mark.slow
def test_evaluate_cli_with_no_validation_examples(evaluated_run, tmp_path):
    """The command that died with an IndexError in tokenize.prepare before."""
    run_dir, _ = evaluated_run
    proc = run_module(
        "instruct.evaluate",
        f"checkpoint={run_dir / 'checkpoints' / 'best'}",
        f"out={tmp_path / 'ev'}",
        *QUICK,
        "max_val_examples=0",
        "logger=none",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ifeval/prompt_strict (tuned, 5 prompts)" in proc.stdout
    assert "skipped: validation loss: max_val_examples=0" in proc.stdout
