"""Optimizer groups and learning-rate schedules; range checks that name their key; fused
AdamW steps as the foreach one does."""

from __future__ import annotations

import pytest
import torch

from instruct.config import check, compose
from instruct.optim import build_optimizer, build_scheduler
from instruct.train import train
from tests.conftest import toy_config


def lrs(schedule: str, steps: int = 10, warmup: int = 2) -> list[float]:
    cfg = compose(
        [f"optimizer.scheduler={schedule}", f"optimizer.warmup_steps={warmup}", "optimizer.lr=1.0"]
    ).optimizer
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.slow
def test_warmup_then_schedule():
    cosine, linear, constant = lrs("cosine"), lrs("linear"), lrs("constant")
    for values in (cosine, linear, constant):
        assert values[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert constant[3:] == pytest.approx([1.0] * 7)
    assert linear[3:] == pytest.approx([1 - k / 8 for k in range(1, 8)])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False))
    assert cosine[5] > linear[5]  # cosine stays high longer


def test_weight_decay_skips_biases():
    cfg = compose(["optimizer.weight_decay=0.1"]).optimizer
    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg)
    decays = {p.ndim: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.eval_every=0", "trainer.eval_every"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("lora.rank=0", "lora.rank"),
    ],
)
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=key):
        check(compose([override]))


@pytest.mark.slow
def test_fused_adamw_takes_the_same_steps_as_foreach(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=4", "trainer.save_best=false")
    fused = train(toy_config(toy_data, tmp_path / "a", "optimizer.fused=true", *common))
    plain = train(toy_config(toy_data, tmp_path / "b", "optimizer.fused=false", *common))
    for (_, x), (_, y) in zip(
        fused["train_loss_history"], plain["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)
