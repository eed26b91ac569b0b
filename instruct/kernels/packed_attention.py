"""Causal attention once per example of a packed row, and the start-up check that packed rows
give a model the outputs of padded batches (``trainer.packing``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import send_to_device

from instruct.data.batching import batch, collate
from instruct.data.tokenize import Feature
from instruct.loss import hidden_or_logits
from instruct.modes import evaluating

log = logging.getLogger(__name__)

PACKED_ATTENTION = "instruct_packed"


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that runs causal attention once per example of a packed row.

    With ``cu_seq_lens_q`` (see :func:`instruct.data.batching.pack`) each example attends only to
    itself, at the cost of its own length squared: no mask over the whole row is read. Any
    other call (padded batches, generation with a KV cache) is plain SDPA with the given mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(name, None)
    dtype = value.dtype  # under autocast, rotary embeddings may have made q and k fp32
    if query.device.type == "cpu":
        # torch's CPU kernels run short bf16 sequences slower than fp32 ones, forward and
        # backward, and fp32 is the more exact of the two.
        # (measured: docs/performance.md, "Measurements behind design choices")
        query, key, value = query.float(), key.float(), value.float()
    edges = bounds.tolist()
    with torch.autocast(query.device.type, enabled=query.device.type != "cpu"):
        outputs = [
            sdpa_attention_forward(
                module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                is_causal=True, **kwargs,
            )[0]
            for a, b in zip(edges[:-1], edges[1:], strict=False)
            if b > a
        ]  # fmt: skip
    return torch.cat(outputs, dim=1).to(dtype), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model: Any) -> str:
    """Make ``model`` attend per example in packed rows; return the implementation in use.

    SDPA models switch to :func:`packed_attention`. Flash-attention models keep their own
    varlen kernels, which read the same ``cu_seq_lens_*``. Anything else keeps its
    implementation, and transformers derives a block mask from the restarting position ids;
    :func:`trust_packing` tests the result either way.
    """
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == "sdpa":
        register_packed_attention()
        model.set_attn_implementation(PACKED_ATTENTION)
        return PACKED_ATTENTION
    return current


@torch.no_grad()
def packing_error(
    model: Any,
    features: Sequence[Feature],
    pad_id: int,
    device: Any,
    length: int = 24,
    make_batch: Callable[[Sequence[Feature], int, bool], dict[str, Any]] = batch,
) -> float:
    """Largest difference between a packed row and the same examples padded, in fp32,
    relative to the largest output (or 1). ``make_batch(features, pad_id, packed=True)``
    makes the packed row.

    A model whose attention ignored the example boundaries would let the second example see
    the first; that shows here as a large difference, so packing is never trusted blindly.
    """
    short = [Feature(f.input_ids[:length], f.labels[:length]) for f in features[:3]]
    with evaluating(model):
        padded, _ = hidden_or_logits(model, send_to_device(collate(short, pad_id), device))
        packed, _ = hidden_or_logits(model, send_to_device(make_batch(short, pad_id, True), device))
    start, worst, scale = 0, 0.0, 1.0
    for row, f in enumerate(short):
        n = len(f.input_ids)
        expected = padded[row, :n].float()
        diff = (expected - packed[0, start : start + n].float()).abs().max()
        worst, start = max(worst, float(diff)), start + n
        scale = max(scale, float(expected.abs().max()))
    return worst / scale


def trust_packing(model: Any, features: list[Feature], pad_id: int, device: Any, attention) -> bool:
    """Whether packed rows give this model the same outputs as padded batches."""
    error = packing_error(model, features, pad_id, device)
    if error <= 1e-3:
        log.info("packing on (attention: %s; packed vs padded differ by %.1e)", attention, error)
        return True
    log.warning(
        "trainer.packing: packed rows differ from padded batches by %.3g on this model "
        "(attention %s), so examples would see each other; training with padding instead",
        error,
        attention,
    )
    return False
