"""DeepSpeed ZeRO stages 1-2: the model runs in DeepSpeed's engine, which owns the backward,
gradient reduction, clipping and the optimizer step.

The fp32 master weights and the optimizer's moments live in flat partitions, a part on each
process, so every process takes part in a save: each is gathered whole for each parameter
(DeepSpeed's ``safe_get_full_*``), into the files and layout a single process writes (torch's
own optimizer state), and put back into the partitions on resume.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from instruct.compat.deepspeed import has_master, link_moments
from instruct.parallel.base import (
    BuildOptimizer,
    FitsPacking,
    Prepared,
    Strategy,
    local_parameters,
    main_decides,
)
from instruct.parallel.full_state import whole, whole_weights


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


def zero_managed(model: Any) -> bool:
    return any(has_master(p) for p in model.parameters())


def master(param: Any, keep: bool) -> torch.Tensor | None:
    """``param``'s fp32 master weights, whole (on the CPU, where ``keep``). Every process must
    call this, in the same order: the parts are added up over all of them."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return full.detach().cpu() if keep else None


def master_or_whole(param: Any, tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """A state-dict entry whole: its parameter's fp32 masters where DeepSpeed keeps some."""
    if param is not None and has_master(param):
        return master(param, keep)
    return whole(tensor, keep)


def zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO (stage 1-2) or bf16 optimizer behind Accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", None)
    if hasattr(inner, "bit16_groups") or hasattr(inner, "bf16_groups"):
        return inner
    return None


def zero_groups(zero: Any) -> list[list[Any]]:
    """The model's parameters in each group, in the order the optimizer was given them."""
    groups = getattr(zero, "bit16_groups", None)
    return groups if groups is not None else zero.bf16_groups


def zero_optimizer_state(zero: Any, keep: bool) -> dict[str, Any]:
    """The state ``torch.optim`` would give for the model's own parameters: each moment whole,
    by parameter index in group order. DeepSpeed's optimizer holds it for flat partitions of
    all the parameters; every process calls this (each moment is gathered from all)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer  # torch's optimizer, over this process's flat fp32 partitions
    flats = [p for g in base.param_groups for p in g["params"]]
    sample = next((base.state[p] for p in flats if p in base.state), {})
    if sample:
        link_moments(zero)
    state: dict[int, dict[str, Any]] = {}
    groups, index = [], 0
    for group, params in zip(base.param_groups, zero_groups(zero), strict=True):
        indices = []
        for param in params:
            entry: dict[str, Any] = {}
            for key, value in sample.items():
                if torch.is_tensor(value) and value.dim() > 0:  # a moment, partitioned
                    full = safe_get_full_optimizer_state(param, key)
                    entry[key] = full.detach().cpu() if keep else None
                else:  # the step count, the same for every parameter
                    entry[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            if entry:
                state[index] = entry
            indices.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    return {"state": state, "param_groups": groups} if keep else {}


def load_zero_state(
    zero: Any, saved: dict[str, Any], weights: dict[int, torch.Tensor], where: Path
) -> None:
    """Put a whole optimizer state (:func:`zero_optimizer_state`'s layout, or a single
    process's) and the trained weights (by parameter index) into DeepSpeed's partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base, groups = zero.optimizer, zero_groups(zero)
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g) for g in groups]:
        raise ValueError(
            f"{where}: its optimizer has parameter groups of {sizes} parameters; this run's has "
            f"{[len(g) for g in groups]}"
        )
    for group, saved_group in zip(base.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    params = [p for g in groups for p in g]
    entries = saved["state"]
    if entries:
        # torch's optimizer makes its state at the first step: make it now, for the flat
        # partitions, so that DeepSpeed can point each parameter at its part of it.
        sample = next(iter(entries.values()))
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {
                    key: torch.zeros_like(flat)
                    if torch.is_tensor(v) and v.dim() > 0
                    else (v.clone().to(flat.device) if torch.is_tensor(v) else v)
                    for key, v in sample.items()
                }
        link_moments(zero)
        for index, param in enumerate(params):
            for key, value in entries.get(index, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    safe_set_full_optimizer_state(param, value, key)
    for index, param in enumerate(params):
        if index in weights:
            safe_set_full_fp32_param(param, weights[index].float())


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

    def model_weights(self, model: Any, keep: bool) -> dict[str, torch.Tensor] | None:
        return whole_weights(model, keep, master_or_whole) if zero_managed(model) else None

    def whole_parameter(self, param: Any, keep: bool) -> torch.Tensor | None:
        return master(param, keep) if has_master(param) else whole(param, keep)

    def optimizer_state(self, model: Any, optimizer: Any, keep: bool) -> dict[str, Any]:
        zero = zero_optimizer(optimizer)
        if zero is None:
            return super().optimizer_state(model, optimizer, keep)
        return zero_optimizer_state(zero, keep)

    def load_optimizer(
        self, model: Any, optimizer: Any, saved: dict[str, Any], params: dict[str, Any],
        trained: dict[str, torch.Tensor], where: Any,
    ) -> None:  # fmt: skip
        """The fp32 masters and moments into DeepSpeed's partitions."""
        zero = zero_optimizer(optimizer)
        if zero is None:
            return super().load_optimizer(model, optimizer, saved, params, trained, where)
        index = {id(p): i for i, p in enumerate(p for g in zero_groups(zero) for p in g)}
        weights = {index[id(p)]: trained[name] for name, p in params.items() if id(p) in index}
        load_zero_state(zero, saved, weights, where)
