"""Evaluation: base vs tuned on validation + test prompts, reports, W&B, no overwrites."""

from __future__ import annotations

import json

import pytest

from instruct.config import compose
from instruct.evaluate import load_test_instructions, run_evaluation, test_instructions_path
from instruct.tracking import read_offline_run
from tests.conftest import run_module


def eval_config(checkpoint, *overrides):
    return compose(
        [f"checkpoint={checkpoint}", "sampling.max_new_tokens=16", *overrides],
        config_name="evaluate",
    )


@pytest.mark.parametrize("fixture", ["lora_toy", "tuned_toy"])
def test_base_vs_tuned_reports(fixture, request):
    run_dir, results = request.getfixturevalue(fixture)
    summary = run_evaluation(eval_config(run_dir / "checkpoints" / "best"))
    out = run_dir / "eval"
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    n_test = len(load_test_instructions(test_instructions_path()))
    assert len(rows) == summary["prompts"] == summary["validation_prompts"] + n_test
    assert {"instruction", "reference", "response", "base_response"} <= set(rows[0])
    assert rows[0]["source"] == "validation" and rows[0]["reference"]
    assert rows[-1]["source"] == "test" and rows[-1]["checks"]
    # The tuned val loss is the one training recorded as best; the base is the untrained model.
    assert summary["tuned"]["val_loss"] == pytest.approx(results["best_val_loss"], abs=1e-5)
    assert summary["base"]["val_loss"] == pytest.approx(results["initial_val_loss"], abs=1e-5)
    assert summary["tuned"]["val_loss"] < summary["base"]["val_loss"]
    for name in ("base", "tuned"):
        assert 0.0 <= summary[name]["checks_prompt_level"] <= 1.0
    md = (out / "eval.md").read_text()
    assert "| metric | base | tuned |" in md and "| validation loss (responses) |" in md
    assert "<table>" in (out / "eval.html").read_text()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file, wait_seconds=60)
    assert recorded["summary"]["eval/tuned/val_loss"] == pytest.approx(summary["tuned"]["val_loss"])
    (table,) = [r for r in recorded["history"] if r.get("eval/samples/_type") == "table-file"]
    assert table["eval/samples/nrows"] == len(rows)


def test_a_second_evaluation_never_overwrites_the_first(lora_toy):
    run_dir, _ = lora_toy
    best = run_dir / "checkpoints" / "best"
    run_evaluation(eval_config(best, "compare_base=false", "logger=none"))
    run_evaluation(eval_config(best, "compare_base=false", "logger=none"))
    assert (run_dir / "eval-2" / "eval.jsonl").is_file() or (run_dir / "eval-3").is_dir()
    taken = run_dir / "eval"
    with pytest.raises(FileExistsError, match="not empty"):
        run_evaluation(eval_config(best, f"out={taken}", "logger=none"))


def test_a_custom_test_file_is_checked(lora_toy, tmp_path):
    run_dir, _ = lora_toy
    bad = tmp_path / "tests.jsonl"
    bad.write_text('{"instruction": "Say hi.", "checks": [{"type": "max_wordz", "value": 3}]}\n')
    with pytest.raises(ValueError, match=r"tests\.jsonl:1.*max_wordz"):
        run_evaluation(
            eval_config(
                run_dir / "checkpoints" / "best",
                f"test_file={bad}",
                f"out={tmp_path / 'o'}",
                "logger=none",
            )
        )


@pytest.mark.slow
def test_evaluate_cli(tuned_toy, tmp_path):
    run_dir, _ = tuned_toy
    proc = run_module(
        "instruct.evaluate",
        f"checkpoint={run_dir / 'checkpoints' / 'best'}",
        f"out={tmp_path / 'ev'}",
        "sampling.max_new_tokens=8",
        "max_val_examples=2",
        "logger=none",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "validation loss (responses)" in proc.stdout
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["validation_prompts"] == 2
