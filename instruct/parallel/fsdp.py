"""FSDP (``fully_shard``): each process holds a share of every weight and its moments.

Every forward gathers weights with collectives, so every process runs every forward: in
training, in validation (as many batches as process 0) and in generation. Saves gather the
shares (DTensors, a slice on each process) through ``torch.distributed.checkpoint.state_dict``
(whole tensors on the main process, on the CPU), so every process takes part in them and the
files are the ones a single process writes. Loading gives each process its own slice of the
whole tensors it reads.
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
from instruct.parallel.full_state import once_per_weight, whole, whole_weights


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


# The full state goes through torch.distributed.checkpoint.state_dict (DCP): whole tensors
# gathered on the main process (rank 0, our writer) and offloaded to the CPU; every other
# process takes part in each gather and gets {}. On disk the optimizer state stays as
# ``optimizer.state_dict()`` lays it out (keyed by parameter index, as one process writes it),
# so DCP's layout (keyed by parameter name) is converted both ways.


def full_options(cpu_offload: bool = True) -> Any:
    """Whole tensors (on the CPU, on rank 0 only, when ``cpu_offload``). Loads pass whole
    tensors on every process (each read the checkpoint), so no ``broadcast_from_rank0``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def has_frozen(model: Any) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def full_weights(model: Any, keep: bool) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` writes, whole on the CPU where ``keep``: DCP's
    ``get_model_state_dict``, tied weights kept one tensor (:func:`once_per_weight`).

    With frozen weights (LoRA), ours instead (:func:`whole_weights`, one tensor at a time, only
    what peft picks): DCP selects by ``requires_grad`` alone, and its ``ignore_frozen_params``
    still gathers a frozen weight tied to another under its second name (seen with torch
    2.13: ``lm_head.weight``, the whole embedding matrix, on a tied model), while peft may
    also keep frozen embeddings (``save_embedding_layers``, after a vocabulary resize).
    """
    if has_frozen(model):
        return whole_weights(model, keep)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = list(model.state_dict())
    full = get_model_state_dict(model, options=full_options())
    return once_per_weight(model, names, full.get, keep)


def full_trained(model: Any, trained: dict[str, Any], keep: bool) -> dict[str, torch.Tensor]:
    """The ``trained`` parameters (by name) whole on the CPU where ``keep``: DCP's
    ``get_model_state_dict``; with frozen weights (LoRA), one at a time (:func:`whole`), for
    the reason :func:`full_weights` gives."""
    if has_frozen(model):
        gathered = {name: whole(p, keep) for name, p in trained.items()}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=full_options())
        gathered = {name: full.get(name) for name in trained}
    return {name: t.contiguous() for name, t in gathered.items()} if keep else {}


def full_optimizer_state(model: Any, optimizer: Any, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every tensor whole, as one process would have it (where
    ``keep``): DCP's ``get_optimizer_state_dict``, keyed back by parameter index."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # torch's, under Accelerate's wrapper
    if not inner.state:  # no step yet: nothing sharded (DCP would first step with zero grads)
        return inner.state_dict() if keep else {}
    full = get_optimizer_state_dict(model, inner, options=full_options())
    if not keep:
        return {}
    order = [name for group in full["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: values for name, values in full["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in full["param_groups"]
        ],
    }


def load_full_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """A whole optimizer state (:func:`full_optimizer_state`'s) into ``optimizer``, each
    moment sliced as its parameter is: DCP's ``set_optimizer_state_dict``, keyed by name.

    DCP first gives every parameter a state by stepping with zero gradients and a zero
    learning rate (the parameters don't move); the state of a parameter the checkpoint has
    none for (never stepped) is dropped again, as ``load_state_dict`` would leave it. Torch's
    optimizer, not Accelerate's wrapper, whose step would also step a grad scaler.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    reshard(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in inner.param_groups for p in group["params"]]
    order = [name_of[id(p)] for p in params]
    named = {
        "state": {order[i]: values for i, values in saved["state"].items()},
        "param_groups": [
            {**group, "params": [order[i] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, inner, named, options=full_options(cpu_offload=False))
    for i, param in enumerate(params):
        if i not in saved["state"]:
            inner.state.pop(param, None)
    # DCP's load flattens the state and back, which turns a tuple into a list (AdamW's
    # ``betas``: seen with torch 2.13); the saved settings, as load_state_dict keeps them.
    for group, saved_group in zip(inner.param_groups, saved["param_groups"], strict=True):
        group.update({key: v for key, v in saved_group.items() if key != "params"})


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
        return full_weights(model, keep)

    def trained_weights(self, model: Any, keep: bool) -> dict[str, torch.Tensor]:
        return full_trained(model, self.trained_parameters(model), keep)

    def trained_parameters(self, model: Any) -> dict[str, Any]:
        reshard(model)  # the shards, not a copy a forward left gathered
        return super().trained_parameters(model)

    def optimizer_state(self, model: Any, optimizer: Any, keep: bool) -> dict[str, Any]:
        reshard(model)  # DCP names the optimizer's parameters by the model's registered ones
        return full_optimizer_state(model, optimizer, keep)

    def load_weights(
        self, model: Any, params: dict[str, Any], trained: dict[str, torch.Tensor]
    ) -> None:
        """DCP's ``set_model_state_dict``: each process keeps its slice of every whole tensor
        (and the weights not in ``trained`` stay as they are)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        reshard(model)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, dict(trained), options=options)  # it fills in its argument

    def load_optimizer(
        self, model: Any, optimizer: Any, saved: dict[str, Any], params: dict[str, Any],
        trained: dict[str, torch.Tensor], where: Any,
    ) -> None:  # fmt: skip
        load_full_optimizer_state(model, optimizer, saved)
