"""What every backend does the same way, and the plain path (one process, DDP) they share.

A strategy is chosen once per run (:func:`instruct.parallel.strategy_for`) and owns what
differs between backends: preparing the model and optimizer, the backward, clipping and step
of one optimizer step, how validation is split over processes, generating samples, and which
processes take part in a save, and the full state a save gathers and a load scatters. The
loop and :mod:`instruct.checkpoint` call it and never ask which backend they are on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch

from instruct.kernels.memory import cast_frozen
from instruct.parallel.full_state import whole

# (model, optimizer) -> (optimizer, scheduler): built on the model as the strategy has it.
BuildOptimizer = Callable[[Any], tuple[Any, Any]]
# (model, device) -> whether packed rows give the padded batches' losses there.
FitsPacking = Callable[[Any, Any], bool]


class Prepared(NamedTuple):
    model: Any
    optimizer: Any
    scheduler: Any
    packed: bool  # micro-batches as packed rows (see instruct.data.batching.pack)
    held: int  # parameter elements on this process right after prepare


def distributed_kind(accelerator: Any) -> str:
    """``NO``, ``MULTI_GPU``, ``MULTI_CPU``, ``FSDP``, ``DEEPSPEED``, ... (the enum's name)."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def local_parameters(model: Any) -> int:
    """Parameter elements this process holds: all of them, or its shards under FSDP."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def all_ranks_sum(accelerator: Any, *values: float) -> list[float]:
    """``values`` added up over every process (as they are with one)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(values)
    summed = accelerator.reduce(
        torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum"
    )
    return summed.tolist()


def main_decides(accelerator: Any, decide: Callable[[], bool]) -> bool:
    """``decide()`` run on the main process only, its answer given to every process. Under
    FSDP the others may hold no weights before sharding (they wait on the meta device for
    the main process's, with ``fsdp_cpu_ram_efficient_loading``)."""
    value = float(decide()) if accelerator.is_main_process else 0.0
    if accelerator.num_processes > 1:
        summed = accelerator.reduce(
            torch.tensor([value], dtype=torch.float64, device=accelerator.device), "sum"
        )
        value = summed.tolist()[0]
    return value > 0


class Strategy:
    """One process, or several with a whole copy each (DDP): Accelerate's own path.

    ``collective``: whether saving the model needs every process (each holds a share).
    ``lockstep``: whether every forward needs every process (validation and samples then run
    on all of them, as many forwards each).
    """

    collective = False
    lockstep = False

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    @property
    def name(self) -> str:
        """Accelerate's distributed type, as ``results.json`` records it."""
        return distributed_kind(self.accelerator)

    def prepare(
        self, model: Any, trainer: Any, max_grad_norm: float | None,
        build: BuildOptimizer, fits_packing: FitsPacking,
    ) -> Prepared:  # fmt: skip
        """The model and optimizer as Accelerate prepares them; packing checked on the
        prepared model, and frozen weights cast to bf16 after that fp32 check (autocast
        reads bf16 anyway)."""
        accelerator = self.accelerator
        optimizer, scheduler = build(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        held = local_parameters(model)  # before any forward gathers some
        unwrapped = accelerator.unwrap_model(model)
        packed = trainer.packing and fits_packing(unwrapped, accelerator.device)
        if accelerator.mixed_precision == "bf16":  # trainer.precision, auto resolved
            cast_frozen(unwrapped, torch.bfloat16)
        return Prepared(model, optimizer, scheduler, packed, held)

    def scorer(self, model: Any) -> Any:
        """What training losses are taken with: the prepared model."""
        return model

    def evaluated(self, model: Any, scorer: Any) -> Any:
        """What validation losses are taken with: the model without its wrapper."""
        return self.accelerator.unwrap_model(model)

    def generating(self, model: Any) -> AbstractContextManager[None]:
        """Around ``generate`` on the unwrapped ``model``: nothing to do."""
        return nullcontext()

    def accumulating(self, model: Any, last: bool) -> AbstractContextManager[None]:
        """Around a micro-batch's forward and backward: gradients are reduced over processes
        only at the step's last one."""
        return nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model: Any, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, model: Any, optimizer: Any, max_grad_norm: float | None) -> float:
        """Clip, step and zero the gradients; the gradient norm before clipping."""
        max_norm = max_grad_norm or math.inf
        grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        grad_norm = self.whole_norm(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def whole_norm(self, grad_norm: Any) -> Any:
        return grad_norm

    # Full state. A collective backend: every process calls these, in the same order, and
    # only where ``keep`` (the process that writes) are the whole tensors kept, on the CPU.

    def model_weights(self, model: Any, keep: bool) -> dict[str, torch.Tensor] | None:
        """The state dict ``save_pretrained`` writes, gathered whole; None: the model's own."""
        return None

    def trained_weights(self, model: Any, keep: bool) -> dict[str, torch.Tensor]:
        """Every trained parameter by name, whole (on the CPU, where ``keep``)."""
        trained = {
            name: self.whole_parameter(p, keep)
            for name, p in self.trained_parameters(model).items()
        }
        return {name: t.contiguous() for name, t in trained.items()} if keep else {}

    def whole_parameter(self, param: Any, keep: bool) -> torch.Tensor | None:
        return whole(param, keep)

    def optimizer_state(self, model: Any, optimizer: Any, keep: bool) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every tensor whole, as one process has it."""
        state = optimizer.state_dict()
        return state if keep else {}

    def trained_parameters(self, model: Any) -> dict[str, Any]:
        """The trained parameters by name, as saves read and loads write them."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def load_weights(
        self, model: Any, params: dict[str, Any], trained: dict[str, torch.Tensor]
    ) -> None:
        """Copy the whole ``trained`` tensors (read from a checkpoint) into ``params``, the
        trained parameters by name, as this process holds them."""
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trained[name])

    def load_optimizer(
        self, model: Any, optimizer: Any, saved: dict[str, Any], params: dict[str, Any],
        trained: dict[str, torch.Tensor], where: Any,
    ) -> None:  # fmt: skip
        """Load a whole optimizer state (:meth:`optimizer_state`'s) into ``optimizer``;
        ``params`` are the trained parameters, just loaded with the ``trained`` weights."""
        optimizer.load_state_dict(saved)
