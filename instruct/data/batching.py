"""Batches of features: packed rows, or dynamic padding to the longest row.

Left padding for prompts to generate from is the same :func:`padded`, so training and
generation pad one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from instruct.data.tokenize import IGNORE_INDEX, Feature


def padded(
    rows: Sequence[Sequence[int] | np.ndarray], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``: ``rows`` as one long tensor as wide as the longest, padded
    with ``pad_id`` on the right (training batches), or on the left so that every row ends in
    the last column (prompts to generate from). The mask is 1 on each row's own ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate(features: Sequence[Feature], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (never to max_length).

    Padding is marked by position, not by comparing ids, so when pad == eos the trained EOS
    label of a shorter sequence survives.
    """
    input_ids, attention_mask = padded([f.input_ids for f in features], pad_token_id)
    labels, _ = padded([f.labels for f in features], IGNORE_INDEX)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(f.weights is not None for f in features):  # else no key: the loss is unweighted
        width = input_ids.shape[1]
        weights = torch.ones((len(features), width), dtype=torch.float32)
        for row, f in enumerate(features):
            if f.weights is not None:
                weights[row, : len(f.weights)] = torch.from_numpy(f.weights)
        out["weights"] = weights
    return out


def pack(features: Sequence[Feature]) -> dict[str, Any]:
    """One row holding every feature end to end: no padding at all.

    Position ids restart at 0 for each example and ``cu_seq_lens_*`` give the boundaries
    (the names transformers passes to varlen attention), so attention never crosses from one
    example into the next. Each example's first label is ignored: after the shift it would be
    predicted from the previous example's last token.
    """
    lengths = [len(f.input_ids) for f in features]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    labels = np.concatenate([f.labels for f in features]).astype(np.int64)
    labels[bounds[:-1]] = IGNORE_INDEX
    positions = np.arange(bounds[-1]) - np.repeat(bounds[:-1], lengths)
    input_ids = np.concatenate([f.input_ids for f in features]).astype(np.int64)
    bounds = torch.from_numpy(bounds.astype(np.int32))
    out = {
        "input_ids": torch.from_numpy(input_ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    if any(f.weights is not None for f in features):  # else no key: the loss is unweighted
        weights = [
            f.weights if f.weights is not None else np.ones(len(f.labels), np.float32)
            for f in features
        ]
        out["weights"] = torch.from_numpy(np.concatenate(weights))[None]
    return out


def batch(features: Sequence[Feature], pad_token_id: int, packed: bool) -> dict[str, Any]:
    return pack(features) if packed else collate(features, pad_token_id)
