"""One strategy per backend, chosen once from Accelerate's distributed type.

>>> from types import SimpleNamespace
>>> type(strategy_for(SimpleNamespace(distributed_type="DistributedType.FSDP"))).__name__
'Fsdp'
"""

from __future__ import annotations

from typing import Any

from instruct.parallel.base import Strategy, distributed_kind
from instruct.parallel.ddp import DataParallel
from instruct.parallel.deepspeed import DeepSpeed
from instruct.parallel.fsdp import Fsdp
from instruct.parallel.single import Single

# By the name of Accelerate's DistributedType. Any other (MULTI_NPU, MULTI_XPU, ...): DDP.
STRATEGIES: dict[str, type[Strategy]] = {
    "NO": Single,
    "MULTI_CPU": DataParallel,
    "MULTI_GPU": DataParallel,
    "FSDP": Fsdp,
    "DEEPSPEED": DeepSpeed,
}


def strategy_for(accelerator: Any) -> Strategy:
    """The strategy of ``accelerator``'s backend."""
    return STRATEGIES.get(distributed_kind(accelerator), DataParallel)(accelerator)


__all__ = ["STRATEGIES", "Strategy", "strategy_for"]
