"""AdamW and its learning-rate schedule, built from the optimizer config."""

from __future__ import annotations

from typing import Any

import torch

from instruct.compat.torch import fused_kernel_devices
from instruct.config import Scheduler

# transformers' name of each optimizer.scheduler (get_scheduler), warmup included.
SCHEDULES = {
    Scheduler.cosine: "cosine",
    Scheduler.linear: "linear",
    Scheduler.constant: "constant_with_warmup",
}


def build_optimizer(model: Any, cfg: Any) -> torch.optim.Optimizer:
    """AdamW (``optimizer.name``'s one value); weight decay skips biases and norm weights
    (every parameter with ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = cfg.fused if cfg.fused is not None else fused_supported(params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused or None,  # None, not False: torch then picks its foreach kernel
    )


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on CPU or CUDA."""
    devices = fused_kernel_devices()
    return bool(params) and all(
        p.device.type in devices and torch.is_floating_point(p) for p in params
    )


def warmup_steps(cfg: Any, total_steps: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[Scheduler(cfg.scheduler)],
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )
