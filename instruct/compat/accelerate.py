"""Accelerate's process-wide state, which the jobs of a sweep in one process must reset.

Accelerate keeps its state in two class-level dicts (``PartialState``: the process group;
``AcceleratorState``: precision and plugins) and refuses an ``Accelerator`` whose precision
differs from the first one made in the process. Hydra multirun jobs and Optuna trials share
one process, so a job with another ``trainer.precision`` must drop the second dict first.
"""

from __future__ import annotations

from accelerate.state import AcceleratorState

from instruct.compat import Private, missing

REQUIRES = (
    Private("accelerate", "accelerate.state", "AcceleratorState._shared_state"),
    Private("accelerate", "accelerate.state", "AcceleratorState._reset_state"),
    Private("accelerate", "accelerate.state", "AcceleratorState.__init__", "_mixed_precision"),
)


def check() -> list[str]:
    """A message for each private name in :data:`REQUIRES` that is gone."""
    return missing(REQUIRES)


def precision_differs(mixed_precision: str) -> bool:
    """Whether this process already made an Accelerator with another mixed precision.

    Private: the precision is read from ``AcceleratorState._shared_state["_mixed_precision"]``.
    The public ``AcceleratorState().mixed_precision`` is not the same value under DeepSpeed
    (it reads the DeepSpeed config's fp16/bf16 instead of what the Accelerator was given).
    """
    state = AcceleratorState._shared_state
    return bool(state) and state.get("_mixed_precision", mixed_precision) != mixed_precision


def forget_accelerator() -> None:
    """Drop the process's ``AcceleratorState``, keeping ``PartialState`` (the process group).

    Private: ``AcceleratorState._reset_state`` is what Accelerate's own tests use between
    Accelerators of another precision; no public call resets it.
    """
    AcceleratorState._reset_state()
