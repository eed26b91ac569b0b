"""Packed rows, attended per example, give the padded batches' losses and gradients; the
start-up check catches attention that crosses the examples' boundaries."""

from __future__ import annotations

import pytest
import torch

from instruct.data.batching import collate, pack
from instruct.kernels.packed_attention import packing_error, use_packed_attention
from instruct.loss import loss_sum
from instruct.train import train
from instruct.validation import to_device
from tests.conftest import toy_config
from tests.kernels.tiny import tiny


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_packed_row_gives_the_padded_loss_and_gradients(lora):
    _, model, tokenizer, features = tiny(lora, "lora.dropout=0")
    # Float noise of a different summation order, relative to the tensor's scale.
    check_packed_row_gives_padded(model, features, tokenizer.pad_token_id, 1e-5, 1e-5)


def check_packed_row_gives_padded(
    model, features, pad_id: int, loss_rtol: float, tolerance: float
) -> None:
    """One packed row and the same examples padded give ``model`` (on its device, in its
    dtype) the same supervised count, the loss within ``loss_rtol`` (relative) and each
    gradient within ``tolerance`` of its largest element."""
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(inputs):
        model.zero_grad()
        loss, n = loss_sum(model, to_device(inputs, device))
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in params]

    padded = loss_and_grads(collate(features, pad_id))
    packed = loss_and_grads(pack(features))
    assert packed[1] == padded[1] == sum(f.supervised for f in features)
    assert torch.allclose(packed[0], padded[0], rtol=loss_rtol)
    for g_packed, g_padded in zip(packed[2], padded[2], strict=True):
        assert (g_packed - g_padded).abs().max() <= tolerance * g_padded.abs().max()


@pytest.mark.slow
def test_packing_check_catches_attention_across_examples():
    """Without the example boundaries the second example sees the first: the check says so."""
    _, model, tokenizer, features = tiny()
    assert packing_error(model, features, tokenizer.pad_token_id, "cpu") < 1e-4

    def leaky(features, pad_id, packed):
        row = pack(features)
        n = row["input_ids"].shape[1]
        return {"input_ids": row["input_ids"], "position_ids": torch.arange(n)[None]}

    error = packing_error(model, features, tokenizer.pad_token_id, "cpu", make_batch=leaky)
    assert error > 1e-2


@pytest.mark.slow
def test_transformers_block_mask_also_packs_an_eager_model():
    """Models left on another attention get a block mask derived from the position ids."""
    cfg, model, tokenizer, features = tiny(packed=False)
    model.set_attn_implementation("eager")
    assert use_packed_attention(model) == "eager"
    assert packing_error(model, features, tokenizer.pad_token_id, "cpu") < 1e-4
    loss_padded, _ = loss_sum(model.eval(), collate(features, tokenizer.pad_token_id))
    loss_packed, _ = loss_sum(model, pack(features))
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5)


@pytest.mark.slow
def test_packed_and_padded_training_give_the_same_run(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=6", "trainer.save_best=false")
    padded = train(toy_config(toy_data, tmp_path / "a", "trainer.packing=false", *common))
    packed = train(toy_config(toy_data, tmp_path / "b", *common))
    assert packed["packing"] and not padded["packing"]
    for (_, x), (_, y) in zip(
        padded["train_loss_history"], packed["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-4)
    assert packed["final_val_loss"] == pytest.approx(padded["final_val_loss"], rel=1e-4)
    assert packed["supervised_tokens"] == padded["supervised_tokens"]
