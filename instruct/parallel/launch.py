"""Joining a launch (``torchrun``, ``accelerate launch``) and making the run's Accelerator.

This runs before any strategy is chosen: the launcher's environment decides which
distributed type Accelerate records, and :func:`instruct.parallel.strategy_for` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch


def new_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run, even when an earlier run in the process chose another
    precision (Hydra multirun jobs and Optuna trials share one process). Accelerate keeps its
    state process-wide and refuses a change; the distributed part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import is_initialized

    from instruct.compat.accelerate import forget_accelerator, precision_differs

    if precision_differs(mixed_precision):
        forget_accelerator()
    cpu = cpu_only_launch()
    if not is_initialized():
        join_launch()
        offer_fsdp(cpu)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def offer_fsdp(cpu: bool) -> None:
    """Make an FSDP launch (``accelerate launch --config_file conf/accelerate/fsdp.yaml``)
    shard on a machine without GPUs too.

    Accelerate 1.15 turns such a launch into FSDP only when the processes joined as GPU-like
    ones (MULTI_GPU, MULTI_NPU, ...); on CPUs (MULTI_CPU, gloo) it silently trains with plain
    data parallelism. torch's ``fully_shard`` works on CPUs over gloo, so the process group is
    joined as usual and shown to Accelerate as MULTI_GPU for that one choice, which it then
    records as FSDP: from there on, the run takes the code path a GPU run takes. The same
    applies to an Accelerator made again in one process (a sweep), whose process group
    already says FSDP. Without an FSDP launch, nothing changes.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    state = PartialState(cpu=cpu)
    if state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        # PartialState's instances share one dict: this holds for the whole process.
        state.distributed_type = DistributedType.MULTI_GPU


def join_launch() -> Any:
    """This process's Accelerate ``PartialState``, in the launcher's process group.

    A launch on a machine without GPUs joins over gloo (:func:`cpu_only_launch`). Under
    DeepSpeed, Accelerate 1.15 starts the engine only for processes that did not ask for
    ``cpu=True``, and without a GPU it then finds no backend: DeepSpeed joins the processes
    but Accelerate counts one, and each would train alone. Naming gloo keeps both counts.
    """
    from accelerate import PartialState

    if is_deepspeed_launch(os.environ) and not accelerator_available():
        return PartialState(cpu=False, backend="gloo")
    return PartialState(cpu=cpu_only_launch())


def is_deepspeed_launch(environ: Mapping[str, str]) -> bool:
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def cpu_only_launch() -> bool:
    """Whether this is one of several processes (torchrun, accelerate launch) on a machine
    without an accelerator. Accelerate then needs ``cpu=True`` to join them with gloo:
    without it, each process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_deepspeed_launch(os.environ):
        return False  # DeepSpeed: see join_launch
    return not accelerator_available()


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()
