"""Which distributed backend Accelerate runs, read in one place, and sums over its
processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def distributed_kind(accelerator: Any) -> str:
    """``NO``, ``MULTI_GPU``, ``MULTI_CPU``, ``FSDP``, ``DEEPSPEED``, ... (the enum's name)."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def is_fsdp(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the model with FSDP (every forward then needs every
    process, and saves gather the shards)."""
    return distributed_kind(accelerator) == "FSDP"


def is_deepspeed_launch(environ: Mapping[str, str]) -> bool:
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator: Any) -> bool:
    """Whether ``accelerator`` runs the model in a DeepSpeed engine."""
    return distributed_kind(accelerator) == "DEEPSPEED"


def all_ranks_sum(accelerator: Any, *values: float) -> list[float]:
    """``values`` added up over every process (as they are with one)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(values)
    summed = accelerator.reduce(
        torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum"
    )
    return summed.tolist()
