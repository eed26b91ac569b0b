"""FSDP (``fully_shard``): each process holds a share of every weight and its moments.

Every forward gathers weights with collectives, so every process runs every forward: in
training, in validation (as many batches as process 0) and in generation. Saves gather the
shares, so every process takes part in them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from instruct.config import Precision
from instruct.kernels.memory import cast_frozen
from instruct.parallel.base import (
    BuildOptimizer,
    FitsPacking,
    Prepared,
    Strategy,
    local_parameters,
    main_decides,
)


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
        if trainer.precision == Precision.bf16:
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
