"""The sample replies at each validation: generated with LoRA merged, and without any effect
on training."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from instruct.train import train
from tests.conftest import toy_config

LORA = ["lora=default", "lora.rank=4", "lora.dropout=0.1", "template=chatml",
        "trainer.max_steps=4", "trainer.eval_every=2", "logger=none"]  # fmt: skip


def tensors(run_dir):
    best = run_dir / "checkpoints" / "best"
    files = sorted(best.glob("*.safetensors"))
    assert files, f"no weights in {best}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow
def test_sample_replies_leave_training_exactly_as_without_them(toy_data, tmp_path):
    """Replies are generated with the adapters merged into the base weights, which are then
    restored bit for bit: the losses, the dropout draws after them and the best checkpoint are
    those of a run that generates none."""
    with_samples, without = tmp_path / "with", tmp_path / "without"
    a = train(toy_config(toy_data, with_samples, *LORA, "trainer.samples=2"))
    b = train(toy_config(toy_data, without, *LORA, "trainer.samples=0"))
    assert a["train_loss_history"] == b["train_loss_history"]
    assert a["val_loss_history"] == b["val_loss_history"]
    ta, tb = tensors(with_samples), tensors(without)
    assert ta.keys() == tb.keys()
    assert all(ta[k].equal(tb[k]) for k in ta)
    rows = [json.loads(line) for line in (with_samples / "samples.jsonl").open()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4]
    assert all(isinstance(r["response"], str) for r in rows)
    assert not (without / "samples.jsonl").exists()
