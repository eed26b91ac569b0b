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
    names = list(local)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        picked = {id(t) for t in get_peft_model_state_dict(model, state_dict=local).values()}
        names = [name for name in names if id(local[name]) in picked]
    # A weight tied to another (the output layer to the embeddings) is gathered once, and
    # stays one tensor, which save_pretrained then writes once.
    params = dict(model.named_parameters(remove_duplicate=False))
    owner: dict[str, Any] = {n: id(p) for n, p in params.items()}
    gathered: dict[Any, torch.Tensor | None] = {}
    for name in names:
        key = owner.get(name, name)
        if key not in gathered:
            gathered[key] = gather(params.get(name), local[name], keep)
    return {name: gathered[owner.get(name, name)] for name in names} if keep else {}
