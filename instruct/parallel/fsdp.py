"""FSDP (``fully_shard``): each process holds a share of every weight and its moments.

Every forward gathers weights with collectives, so every process runs every forward: in
training, in validation (as many batches as process 0) and in generation. Saves gather the
shares (DTensors, a slice on each process), each tensor whole, one at a time, so every
process takes part in them and the files are the ones a single process writes. Loading gives
each process its own slice of the whole tensors it reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from instruct.kernels.memory import cast_frozen
from instruct.parallel.base import (
    BuildOptimizer,
    FitsPacking,
    Prepared,
    Strategy,
    local_parameters,
    main_decides,
)
from instruct.parallel.full_state import whole, whole_weights


class WholeForward(torch.nn.Module):
    """``module``'s own forward and nothing else of it, as DDP's wrapper is.

    Under FSDP every forward must enter through the sharded root module: its hooks gather the
    weights no layer owns (a final norm, say), and every process runs every forward. Given a
    model it can take apart, :func:`instruct.loss.loss_sum` would call the decoder and the
    output layer on their own, around the root; given this wrapper it takes the model's full
    forward, with ``logits_to_keep`` on packed rows (:func:`instruct.loss.logits_where`).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


@contextmanager
def root_gathered(model: Any) -> Iterator[None]:
    """The root's own weights gathered while ``generate`` runs, on every process.

    transformers' ``generate`` calls the inner model's forward (a PeftModel's base model), so
    the root's hooks, which gather the weights that belong to no layer, do not run; each layer
    and the embeddings still gather their own. ``synced_gpus`` (which transformers turns on
    for a module marked as FSDP-managed) keeps the processes decoding in step until all end.
    """
    from instruct.compat.transformers import mark_fsdp_managed

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mark_fsdp_managed(base)  # transformers' own mark: generate(synced_gpus=True)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def reshard(model: Any) -> None:
    """Every module's weights back in their shards, registered as the module's parameters.
    A forward can leave some gathered (the root's, and those of units that keep them for the
    backward), and a parameter read or written then would be the gathered copy: in the
    compute dtype, and dropped at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` as ``param`` holds it: this process's slice when ``param`` is sharded. Every
    process has the whole tensor (read from the checkpoint), so nothing is sent."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def optimizer_state(optimizer: Any, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every tensor whole, as one process would have it (where
    ``keep``). Each moment (``exp_avg``, ...) is a DTensor sliced like its parameter,
    gathered here in the state dict's order, the same on every process."""
    state = optimizer.state_dict()
    if not any(_has_dtensor(values) for values in state["state"].values()):
        return state if keep else {}
    moments = {
        index: {key: whole(v, keep) if torch.is_tensor(v) else v for key, v in values.items()}
        for index, values in state["state"].items()
    }  # fmt: skip
    return {"state": moments, "param_groups": state["param_groups"]} if keep else {}


def _has_dtensor(values: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in values.values())


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole optimizer state (as :func:`optimizer_state` saved it) with each parameter-shaped
    tensor sliced as its parameter is: what ``optimizer.load_state_dict`` needs."""
    from torch.distributed.tensor import DTensor

    live = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in live):
        return state
    by_index = {
        index: param
        for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True)
        for index, param in zip(saved["params"], live["params"], strict=True)
    }  # fmt: skip
    moments = {}
    for index, values in state["state"].items():
        param = by_index[index]
        moments[index] = {
            key: like(v, param) if torch.is_tensor(v) and v.shape == param.shape else v
            for key, v in values.items()
        }  # the step count (a scalar) stays as it is
    return {**state, "state": moments}


class Fsdp(Strategy):
    """FSDP (Accelerate's ``FSDP``)."""

    collective = True
    lockstep = True

    def prepare(
        self, model: Any, trainer: Any, max_grad_norm: float | None,
        build: BuildOptimizer, fits_packing: FitsPacking,
    ) -> Prepared:  # fmt: skip
        """Packing checked before sharding casts the weights to the compute dtype (bf16), on
        the main process, which holds them all; the frozen base sharded as stored, in bf16
        (half the memory)."""
        accelerator = self.accelerator
        packed = trainer.packing and main_decides(accelerator, lambda: fits_packing(model, "cpu"))
        if accelerator.mixed_precision == "bf16":  # trainer.precision, auto resolved
            cast_frozen(model, torch.bfloat16)
        optimizer, scheduler = build(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        return Prepared(model, optimizer, scheduler, packed, local_parameters(model))

    def scorer(self, model: Any) -> Any:
        """The root's own forward (:class:`WholeForward`), which every process runs in step."""
        return WholeForward(model)

    def evaluated(self, model: Any, scorer: Any) -> Any:
        return scorer

    def generating(self, model: Any) -> AbstractContextManager[None]:
        return root_gathered(model)

    def whole_norm(self, grad_norm: Any) -> Any:
        if hasattr(grad_norm, "full_tensor"):  # a DTensor, the same on every process
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def model_weights(self, model: Any, keep: bool) -> dict[str, torch.Tensor] | None:
        return whole_weights(model, keep)

    def trained_parameters(self, model: Any) -> dict[str, Any]:
        reshard(model)  # the shards, not a copy a forward left gathered
        return super().trained_parameters(model)

    def optimizer_state(self, optimizer: Any, keep: bool) -> dict[str, Any]:
        return optimizer_state(optimizer, keep)

    def local_part(self, full: torch.Tensor, param: Any) -> torch.Tensor:
        return like(full, param)

    def load_optimizer(
        self, optimizer: Any, saved: dict[str, Any], params: dict[str, Any],
        trained: dict[str, torch.Tensor], where: Any,
    ) -> None:  # fmt: skip
        optimizer.load_state_dict(shard_optimizer_state(saved, optimizer))
