"""On CUDA a packed row gives the padded batch's loss and gradients, with SDPA (our per-example
attention, :mod:`instruct.kernels.packed_attention`) and with flash attention's varlen kernels
when ``flash_attn`` is installed (the CPU test's check, tests/kernels/test_packed_attention.py,
on the GPU).

Tolerances: SDPA in fp32, the loss within 1e-5 (relative) and gradients within 1e-4 of their
largest element; flash attention (bf16 only), the loss within 1% and gradients within 3% of
their largest element (bf16 keeps 8 bits of mantissa: 0.4% a rounding, and the padded and
packed batches round in different places), and its packed loss within 2% of SDPA's fp32 one.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from instruct.data.batching import pack
from instruct.kernels.packed_attention import packing_error, use_packed_attention
from instruct.loss import loss_sum
from instruct.validation import to_device
from tests.kernels.test_packed_attention import check_packed_row_gives_padded
from tests.kernels.tiny import tiny

pytestmark = pytest.mark.gpu
LORAS = ["lora=none", "lora=default"]


@pytest.mark.parametrize("lora", LORAS)
def test_packed_row_on_cuda_with_sdpa_gives_the_padded_loss_and_gradients(lora):
    _, model, tokenizer, features = tiny(lora, "lora.dropout=0")  # asserts our SDPA is in use
    model.to("cuda")
    assert packing_error(model, features, tokenizer.pad_token_id, "cuda") < 1e-4
    check_packed_row_gives_padded(model, features, tokenizer.pad_token_id, 1e-5, 1e-4)


def flash_model(lora: str):
    """The tiny model in bf16 on the GPU with flash attention 2; (model, pad id, features)."""
    _, model, tokenizer, features = tiny(lora, "lora.dropout=0", packed=False)
    model.to("cuda", torch.bfloat16)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("flash_attention_2")
    assert use_packed_attention(base) == "flash_attention_2"  # its own varlen kernels
    return model, tokenizer.pad_token_id, features


@pytest.mark.parametrize("lora", LORAS)
def test_packed_row_on_cuda_with_flash_attention_gives_the_padded_loss_and_gradients(lora):
    if importlib.util.find_spec("flash_attn") is None:  # here, so no CUDA is the one reason
        pytest.skip("flash_attn is not installed")
    model, pad_id, features = flash_model(lora)
    assert packing_error(model, features, pad_id, "cuda") < 2e-2
    check_packed_row_gives_padded(model, features, pad_id, 1e-2, 3e-2)
    _, reference, _, _ = tiny(lora, "lora.dropout=0")  # SDPA, fp32
    reference.to("cuda")
    with torch.no_grad():
        row = to_device(pack(features), "cuda")
        flash, _ = loss_sum(model, row)
        sdpa, _ = loss_sum(reference, row)
    assert flash.item() == pytest.approx(sdpa.item(), rel=2e-2)
