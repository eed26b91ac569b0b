"""What a run trains, on its backend: the live objects an optimizer step, a validation, the
sample replies and a checkpoint act on."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from instruct.loss import loss_sum
from instruct.parallel import Strategy

# (model, batch, fused) -> (summed loss, supervised tokens), as instruct.loss.loss_sum.
LossFn = Callable[[Any, dict[str, Any], bool], tuple[torch.Tensor, int]]


@dataclass
class Engine:
    """The prepared model with its tokenizer, optimizer and scheduler, the Accelerate
    ``Accelerator`` that placed them, the strategy of its backend, and the training loss."""

    accelerator: Any
    strategy: Strategy  # what differs between backends (see instruct.parallel)
    model: Any  # as the strategy prepared it (wrapped on several processes)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn = loss_sum  # the training micro-batches' summed loss and token count

    @functools.cached_property
    def scorer(self) -> Any:
        """What training losses are taken with (see :meth:`Strategy.scorer`)."""
        return self.strategy.scorer(self.model)

    @property
    def main(self) -> bool:
        """Whether this is the process that writes (files, logs)."""
        return self.accelerator.is_main_process

    def unwrapped(self) -> Any:
        """The model without the backend's wrapper (a sharded one keeps its shards)."""
        return self.accelerator.unwrap_model(self.model)
