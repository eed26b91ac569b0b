"""Dropout drawn as masks or as positions drops each element with probability p, follows
torch's seed, and trains the run that masks train."""

from __future__ import annotations

import copy

import pytest
import torch

from instruct.kernels.dropout import POSITIONS_BELOW, DropoutDrawer
from instruct.train import setup, train
from tests.conftest import toy_config


def test_keep_mask_keeps_with_probability_1_minus_p_and_follows_the_seed():
    drawer = DropoutDrawer()
    torch.manual_seed(0)
    keep = drawer.keep_mask((1000, 1000), 0.1, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    # 1e6 draws: the keep rate is within 5 standard deviations (1.5e-3) of 0.9.
    assert abs(keep.float().mean().item() - 0.9) < 1.5e-3
    # and no share of the threads repeats another's numbers
    halves = keep.view(2, -1)
    assert not torch.equal(halves[0], halves[1])
    torch.manual_seed(0)
    assert torch.equal(drawer.keep_mask((1000, 1000), 0.1, "cpu"), keep)  # the seed fixes it
    assert not torch.equal(drawer.keep_mask((1000, 1000), 0.1, "cpu"), keep)  # a new draw


def test_each_drawer_owns_its_threads_and_a_copy_draws_the_same_masks():
    """No pool shared through the module: each drawer has its own, and a copied model's
    drawer (copied without its threads) makes its own and draws what the original draws."""
    first, second = DropoutDrawer("mask"), DropoutDrawer("mask")
    masks = []
    for drawer in (first, second, copy.deepcopy(first)):
        torch.manual_seed(0)
        masks.append(drawer.keep_mask((300, 1000), 0.1, "cpu"))
    assert all(torch.equal(m, masks[0]) for m in masks)
    threads = torch.get_num_threads()
    assert first.pool(threads) is not second.pool(threads)
    assert first.pool(threads) is first.pool(threads)


def test_dropped_positions_drop_each_element_with_probability_p_and_follow_the_seed():
    dropped_positions = DropoutDrawer.dropped_positions
    n, p = 1_000_000, 0.1
    for batch in (None, 1000):  # enough at once, or drawn in many rounds
        torch.manual_seed(0)
        drop = dropped_positions(n, p, batch)
        assert drop.dtype == torch.int64
        assert int(drop[0]) >= 0 and int(drop[-1]) < n and bool((drop.diff() > 0).all())
        # 1e6 elements: the count is within 5 standard deviations (1,500) of 100,000
        assert abs(len(drop) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
        # independent drops: the gaps between them are geometric with mean 1 / p and
        # P(gap = k) = (1 - p)**(k - 1) * p; an off-by-one or a bias in the gaps fails here
        gaps = drop.diff()
        assert abs(gaps.double().mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / len(gaps)) ** 0.5
        for k in (1, 2, 10):
            share, want = (gaps == k).double().mean().item(), (1 - p) ** (k - 1) * p
            assert abs(share - want) < 5 * (want * (1 - want) / len(gaps)) ** 0.5, k
        torch.manual_seed(0)
        assert torch.equal(dropped_positions(n, p, batch), drop)  # the seed fixes the draw
        assert not torch.equal(dropped_positions(n, p, batch), drop)  # each call draws anew
    assert len(dropped_positions(0, 0.1)) == 0


def test_dropout_is_drawn_as_positions_on_the_cpu_at_low_rates_and_as_a_mask_otherwise():
    shape = torch.Size((40, 50))
    kinds = {
        (how, p, device): DropoutDrawer(how).draw(shape, p, device).dtype
        for how in ("auto", "positions", "mask")
        for p in (0.05, POSITIONS_BELOW)  # auto: positions below POSITIONS_BELOW only
        for device in ("cpu", "meta")  # meta: a device other than the CPU
    }
    low, high = 0.05, POSITIONS_BELOW
    positions = {("auto", low, "cpu"), ("positions", low, "cpu"), ("positions", high, "cpu")}
    assert {key for key, dtype in kinds.items() if dtype == torch.int64} == positions
    assert all(dtype == torch.bool for key, dtype in kinds.items() if key not in positions)
    with pytest.raises(ValueError, match="'sparse' is not a valid DropoutDraw"):
        DropoutDrawer("sparse")


class PositionsOfTheMask(DropoutDrawer):
    """Draws dropout as positions, read off the very mask a mask drawer draws from the same
    seed: what a drawer of masks drops, given as positions."""

    def __init__(self) -> None:
        super().__init__("positions")
        self.masks, self.calls = DropoutDrawer("mask"), []

    def dropped_positions(self, n: int, p: float, batch: int | None = None) -> torch.Tensor:
        self.calls.append(n)
        return (~self.masks.keep_mask((n,), p, "cpu")).nonzero().squeeze(1)


@pytest.mark.slow
def test_a_run_with_dropout_positions_trains_as_one_with_the_same_masks(toy_data, tmp_path):
    """Whole runs, every adapted layer, packed rows: dropout drawn as positions gives the
    losses of dropout drawn as masks when both drop the same elements."""
    common = ("logger=none", "trainer.max_steps=5", "trainer.save_best=false",
              "lora=default", "lora.dropout=0.1")  # fmt: skip
    by_mask = train(toy_config(toy_data, tmp_path / "a", "lora.dropout_draw=mask", *common))
    run = setup(toy_config(toy_data, tmp_path / "b", "lora.dropout_draw=positions", *common))
    # The run's fused layers share the drawer the config named; they are given this one.
    layers = [m for m in run.engine.model.modules() if hasattr(m, "dropout_drawer")]
    drawer = PositionsOfTheMask()
    for layer in layers:
        layer.dropout_drawer = drawer
    positions = run.loop()
    run.tracker.finish()
    assert layers and len(drawer.calls) >= 5 * len(layers)  # every layer, every step
    assert positions["final_val_loss"] == pytest.approx(by_mask["final_val_loss"], rel=1e-5)
    for (_, x), (_, y) in zip(
        positions["train_loss_history"], by_mask["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)
