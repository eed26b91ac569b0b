"""DeepSpeed ZeRO stages 1-2: the model runs in DeepSpeed's engine, which owns the backward,
gradient reduction, clipping and the optimizer step; the fp32 masters and moments are split
over processes, so every process takes part in a save."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from instruct.parallel.base import (
    BuildOptimizer,
    FitsPacking,
    Prepared,
    Strategy,
    local_parameters,
    main_decides,
)


def hand_over_to_deepspeed(accelerator: Any, t: Any, max_grad_norm: float | None) -> int:
    """Put the run's batch, accumulation and clipping into the DeepSpeed config (its
    ``auto`` values would be Accelerate's defaults, not ours); the ZeRO stage.

    Stage 3 is refused before anything is partitioned: its weights exist only as shards
    gathered inside DeepSpeed's hooks, which this loop's checkpoints, validation and
    samples do not go through; FSDP (conf/accelerate/fsdp.yaml) shards a model instead.
    """
    plugin = accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage or 0)
    if stage >= 3:
        raise NotImplementedError(
            "accelerate launch with DeepSpeed ZeRO stage 3: not supported by this trainer (its "
            "checkpoints, validation and samples need the weights whole). To shard the model "
            "itself, launch with conf/accelerate/fsdp.yaml; ZeRO stage 1 or 2 "
            "(conf/accelerate/deepspeed_zero2.yaml) splits the optimizer state and gradients"
        )
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = t.batch_size
    config["gradient_accumulation_steps"] = t.grad_accum
    config["train_batch_size"] = t.batch_size * t.grad_accum * accelerator.num_processes
    config["gradient_clipping"] = float(max_grad_norm or 0.0)  # 0: DeepSpeed does not clip
    return stage


class DeepSpeed(Strategy):
    """DeepSpeed (Accelerate's ``DEEPSPEED``)."""

    collective = True

    def prepare(
        self, model: Any, trainer: Any, max_grad_norm: float | None,
        build: BuildOptimizer, fits_packing: FitsPacking,
    ) -> Prepared:  # fmt: skip
        """Our settings handed over, packing checked before the engine casts the weights to
        the compute dtype; the model comes back as its engine, which with bf16 holds every
        weight in bf16 and fp32 copies of the trained ones in the optimizer."""
        accelerator = self.accelerator
        hand_over_to_deepspeed(accelerator, trainer, max_grad_norm)
        packed = trainer.packing and main_decides(accelerator, lambda: fits_packing(model, "cpu"))
        optimizer, scheduler = build(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        return Prepared(model, optimizer, scheduler, packed, local_parameters(model))

    def accumulating(self, model: Any, last: bool) -> AbstractContextManager[None]:
        return nullcontext()  # the engine reduces at the accumulation boundary itself

    def backward(self, model: Any, loss: torch.Tensor, last: bool) -> None:
        """The engine's own backward: it reduces at the boundary."""
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)  # already token-weighted

    def optimizer_step(self, model: Any, optimizer: Any, max_grad_norm: float | None) -> float:
        """The engine clips (its gradient_clipping), steps and zeroes the gradients."""
        model.step()
        grad_norm = model.get_global_grad_norm()  # None: a step fp16 overflow skipped
        return math.nan if grad_norm is None else float(grad_norm)
