"""The validation loss: the mean over every supervised token of a split, as training weighs
it, shared by the training loop and ``python -m instruct.evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from instruct.data.batching import batch
from instruct.data.tokenize import Feature
from instruct.loss import loss_sum
from instruct.modes import evaluating
from instruct.parallel.base import all_ranks_sum
from instruct.progress import progress


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    features: Sequence[Feature],
    batch_size: int,
    pad_id: int,
    device: Any,
    packed: bool = False,
    autocast: Any = nullcontext,
    fused: bool = True,
    accelerator: Any = None,
    lockstep: bool = False,
) -> float:
    """Mean loss over every supervised token of ``features`` (token-weighted, not per batch);
    the weighted mean when features carry loss weights, as in training.

    With several processes (``accelerator``), each takes every world-size-th example and the
    sums are added up over all of them: every example counts exactly once. In ``lockstep``
    (every forward needs every process: see ``instruct.parallel``) all run as many batches as
    process 0 (which has the most); one with fewer runs its last ones on an example it then
    leaves out.
    """
    total, count = 0.0, 0
    ordered = sorted(features, key=lambda f: len(f.input_ids))  # less padding, same sum
    mine, rounds = ordered, len(ordered)
    if accelerator is not None and accelerator.num_processes > 1:
        mine = ordered[accelerator.process_index :: accelerator.num_processes]
        rounds = len(ordered[:: accelerator.num_processes]) if lockstep else len(mine)
    main = accelerator is None or accelerator.is_main_process
    steps = progress(range(0, rounds, batch_size), desc="validate", unit="batch", main=main)
    with evaluating(model):
        for i in steps:
            part, weight = mine[i : i + batch_size], 1
            if not part:  # lockstep: a forward for the other processes' sake
                part, weight = ordered[:1], 0
            inputs = to_device(batch(part, pad_id, packed), device)
            with autocast():
                loss, n = loss_sum(model, inputs, fused)
            total, count = total + loss.item() * weight, count + n * weight
    total, count = all_ranks_sum(accelerator, total, count)
    return total / max(count, 1)
