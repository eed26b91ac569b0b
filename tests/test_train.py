"""End to end on the tiny model through compose() + train(): loss, W&B files, results, best."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from instruct.checkpoint import load_checkpoint
from instruct.compat import installed_versions
from instruct.data import load_splits
from instruct.data.features import tokenize_split
from instruct.tracking import read_offline_run
from instruct.train import train
from instruct.validation import evaluate
from tests.conftest import toy_config

RESULT_KEYS = {
    "best_val_loss",
    "best_step",
    "initial_val_loss",
    "final_val_loss",
    "train_loss_history",
    "val_loss_history",
    "supervised_tokens",
    "train_seconds",
    "checkpoint",
}


@pytest.fixture(scope="module")
def full_run(toy_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = toy_config(toy_data, run_dir)
    return cfg, train(cfg), run_dir


@pytest.mark.slow
def test_loss_is_finite_and_decreases(full_run):
    _, results, _ = full_run
    train_losses = [v for _, v in results["train_loss_history"]]
    assert all(math.isfinite(v) for v in train_losses)
    assert len(train_losses) == 12
    assert sum(train_losses[-3:]) / 3 < 0.7 * sum(train_losses[:3]) / 3
    assert results["best_val_loss"] < 0.7 * results["initial_val_loss"]
    assert [s for s, _ in results["val_loss_history"]] == [0, 4, 8, 12]


@pytest.mark.slow
def test_results_json_is_complete(full_run):
    _, results, run_dir = full_run
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # curves too
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(on_disk)
    assert on_disk["best_val_loss"] == min(v for _, v in on_disk["val_loss_history"])
    assert on_disk["supervised_tokens"] > 0 and on_disk["train_seconds"] > 0
    assert Path(on_disk["checkpoint"]) == run_dir / "checkpoints" / "best"
    env = on_disk["environment"]  # what it trained with and on
    assert env == results["environment"] and env["versions"] == installed_versions()
    assert {"torch", "transformers", "peft", "accelerate", "wandb", "instruct"} <= set(
        env["versions"]
    )
    assert {"git", "python", "os", "cpu", "cpu_cores", "gpus", "gpu_count", "cuda"} <= set(env)
    assert on_disk["config"]["trainer"]["max_steps"] == results["config"]["trainer"]["max_steps"]
    assert on_disk["config"]["run_dir"] == str(run_dir)
    split = on_disk["time_split"]  # where the time went, in the order the run goes
    assert list(split) == ["load", "prepare", "train", "validate", "samples", "checkpoints"]
    assert split["train"] == pytest.approx(on_disk["train_seconds"])
    assert sum(split.values()) <= on_disk["total_seconds"]
    assert on_disk["memory"]["peak_rss_gib"] > 0.1 and on_disk["precision"] == "fp32"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_losses(full_run):
    _, results, run_dir = full_run
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = read_offline_run(run_file, wait_seconds=60)
    assert recorded["complete"]  # W&B's writer flushed up to the run's exit record
    train_steps = [r["_step"] for r in recorded["history"] if "train/loss" in r]
    val = [(r["_step"], r["val/loss"]) for r in recorded["history"] if "val/loss" in r]
    assert train_steps == list(range(1, 13))
    assert val == [tuple(p) for p in results["val_loss_history"]]
    assert all(
        "train/lr" in r and "train/grad_norm" in r and "train/tokens_per_s" in r
        for r in recorded["history"]
        if "train/loss" in r
    )
    assert recorded["summary"]["best_val_loss"] == pytest.approx(results["best_val_loss"])
    assert recorded["summary"]["best_step"] == results["best_step"]
    assert recorded["config"]["lora"]["enabled"] is False
    assert recorded["config"]["environment"]["versions"] == results["environment"]["versions"]


def assert_reloads_to_best(run_dir: Path, results: dict) -> None:
    best = run_dir / "checkpoints" / "best"
    assert {"config.yaml", "template.yaml", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    assert any(p.suffix == ".safetensors" for p in best.iterdir())
    model, tokenizer, cfg = load_checkpoint(best)
    _, val_examples = load_splits(cfg.data, cfg.seed)
    val_set, _ = tokenize_split(val_examples, cfg, tokenizer)
    loss = evaluate(model, val_set, 8, tokenizer.pad_token_id, "cpu")
    assert loss == pytest.approx(results["best_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_best_checkpoint_reloads_to_the_same_val_loss(full_run):
    _, results, run_dir = full_run
    assert_reloads_to_best(run_dir, results)


@pytest.mark.slow
def test_lora_run_keeps_an_adapter_that_reloads(toy_data, tmp_path):
    cfg = toy_config(
        toy_data,
        tmp_path,
        "lora=default",
        "lora.rank=4",
        "trainer.max_steps=4",
        "template=chatml",
        "logger=none",
        "optimizer.lr=1e-2",
    )
    results = train(cfg)
    assert results["best_val_loss"] < results["initial_val_loss"]
    assert (tmp_path / "checkpoints" / "best" / "adapter_model.safetensors").is_file()
    assert results["trainable_parameters"] < results["total_parameters"] / 5
    assert_reloads_to_best(tmp_path, results)


@pytest.mark.slow
def test_same_seed_same_losses(toy_data, tmp_path, full_run):
    cfg, results, _ = full_run
    again = train(toy_config(toy_data, tmp_path, "logger=none"))
    assert again["train_loss_history"] == results["train_loss_history"]
    assert again["val_loss_history"] == results["val_loss_history"]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(toy_data, tmp_path):
    """The loss is the mean over supervised tokens of the whole step, not a mean of means."""
    common = ("logger=none", "trainer.max_steps=3", "trainer.save_best=false")
    big = train(toy_config(toy_data, tmp_path / "a", "trainer.batch_size=6", *common))
    accum = train(
        toy_config(
            toy_data, tmp_path / "b", "trainer.batch_size=3", "trainer.grad_accum=2", *common
        )
    )
    for (_, x), (_, y) in zip(big["train_loss_history"], accum["train_loss_history"], strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    assert big["final_val_loss"] == pytest.approx(accum["final_val_loss"], abs=1e-5)


@pytest.mark.slow
def test_each_evaluation_logs_generated_samples(full_run):
    _, results, run_dir = full_run
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [
        s for s, _ in results["val_loss_history"] for _ in range(3)
    ]
    assert all({"prompt", "reference", "response"} <= set(r) for r in rows)
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_offline_run(run_file, wait_seconds=60)["history"]
    tables = [r for r in history if r.get("samples/_type") == "table-file"]
    assert len(tables) == 4 and tables[0]["samples/nrows"] == 3
