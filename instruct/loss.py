"""The response-only loss: summed cross-entropy at supervised positions.

A batch with ``weights`` (per-token loss weights, :mod:`instruct.data.turns`) sums ``w * loss``
and counts ``sum(w)`` instead, so the mean the caller forms is the weighted mean; a batch
without them takes exactly the unweighted path.

Two levers, each exact to float precision and switchable in ``trainer``:

- the output layer runs only at supervised positions (always, where the model allows it);
- ``fused_loss``: that output layer and the cross-entropy run together in chunks of rows, and
  the gradients are formed on the spot, so the ``rows x vocabulary`` logits, their
  log-softmax and their gradient never exist at full size
  (:mod:`instruct.kernels.fused_ce`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from instruct.data.tokenize import IGNORE_INDEX
from instruct.kernels.fused_ce import linear_cross_entropy

NOT_INPUTS = ("labels", "weights")  # batch keys the loss reads, never the model


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and output layer of a causal LM, when calling them apart is exact.

    Not for models whose forward changes the logits after the output layer (Gemma's
    soft-capping, Cohere's logit scale), nor for a wrapper such as DDP whose own forward must
    run for gradients to synchronise; those take the full forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def hidden_or_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The last hidden states and the output layer to apply, or logits and ``None``.

    Inputs are a padded batch (``attention_mask``) or a packed row (``position_ids`` and
    ``cu_seq_lens_*``). No KV cache: with one, transformers stops reading packed rows from the
    position ids and the examples of a row would attend to each other.
    """
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    parts = decoder_and_head(model)
    if parts is None:
        return model(**inputs, use_cache=False).logits, None
    decoder, head = parts
    return decoder(**inputs, use_cache=False).last_hidden_state, head


def loss_sum(
    model: Any, batch: dict[str, Any], fused: bool = True
) -> tuple[torch.Tensor, int | float]:
    """Summed cross-entropy over supervised positions, and how many there were.

    The output layer runs only where a label is supervised: with a 49k vocabulary the full
    logits of a batch take gigabytes, and prompt positions would be computed to be dropped.
    With ``batch["weights"]``: the sum of ``weight x loss`` and the sum of the weights.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels[mask]
    weights = batch["weights"][:, 1:][mask].float() if "weights" in batch else None
    count = len(targets) if weights is None else float(weights.sum(dtype=torch.float64))
    if decoder_and_head(model) is None and labels.shape[0] == 1:
        picked = logits_where(model, batch, mask)
        return summed_cross_entropy(picked, targets, weights), count
    out, head = hidden_or_logits(model, batch)
    if head is None:
        picked = out[:, :-1][mask]
    else:
        rows = out[:, :-1][mask]
        if fused and type(head) is torch.nn.Linear:
            loss = linear_cross_entropy(rows, head.weight, head.bias, targets, weights)
            return loss, count
        picked = head(rows)
    return summed_cross_entropy(picked, targets, weights), count


def summed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()


def logits_where(model: Any, batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """Logits of a one-row batch at the positions ``mask`` marks, through the model's own
    forward (a DDP wrapper's must run for gradients to synchronise): transformers' causal
    LMs take ``logits_to_keep`` as positions, so the output layer runs only there."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    positions = mask[0].nonzero().squeeze(1)
    try:
        return model(**inputs, use_cache=False, logits_to_keep=positions).logits[0]
    except TypeError:  # a model without logits_to_keep: every position, then pick
        return model(**inputs, use_cache=False).logits[0, :-1][mask[0]]
