"""Tensors gathered whole for a save, as one process would hold them.

Every process calls these for a sharded model (FSDP's DTensors, DeepSpeed's partitions), in
the same order: each tensor is gathered from all of them. Only where ``keep`` (the process
that writes) are the whole tensors kept, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# (parameter or None for a buffer, its state-dict entry, keep) -> the entry whole, or None
Gather = Callable[[Any, torch.Tensor, bool], torch.Tensor | None]


def whole(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """``tensor`` whole, on the CPU, where ``keep`` (else None). A DTensor is gathered from
    every process: all of them must call this for it, in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu() if keep else None


def whole_entry(param: Any, tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """A state-dict entry whole (:func:`whole`), whatever parameter it belongs to."""
    return whole(tensor, keep)


def whole_weights(model: Any, keep: bool, gather: Gather = whole_entry) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` writes, gathered whole (on the CPU, where ``keep``).

    For LoRA, only the entries peft picks (adapters, and embeddings it decides to keep), so
    the frozen base is never gathered; otherwise every entry.
    """
    local = model.state_dict()  # DTensors: no communication yet
    params = dict(model.named_parameters(remove_duplicate=False))
    names = saved_names(model, local)
    return once_per_weight(model, names, lambda n: gather(params.get(n), local[n], keep), keep)


def saved_names(model: Any, local: dict[str, torch.Tensor]) -> list[str]:
    """The entries of ``local`` (``model.state_dict()``) that ``save_pretrained`` writes: for
    LoRA, those peft picks; otherwise all of them."""
    names = list(local)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        picked = {id(t) for t in get_peft_model_state_dict(model, state_dict=local).values()}
        names = [name for name in names if id(local[name]) in picked]
    return names


def once_per_weight(
    model: Any, names: list[str], gather: Callable[[str], torch.Tensor | None], keep: bool
) -> dict[str, torch.Tensor]:
    """``gather(name)`` for each of ``names``, in order, where ``keep``.

    A weight tied to another (the output layer to the embeddings) is gathered once, and
    stays one tensor, which save_pretrained then writes once.
    """
    owner = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    gathered: dict[Any, torch.Tensor | None] = {}
    for name in names:
        key = owner.get(name, name)
        if key not in gathered:
            gathered[key] = gather(name)
    return {name: gathered[owner.get(name, name)] for name in names} if keep else {}
