"""Data parallelism (DDP): a whole copy of the model per process, gradients averaged.

Accelerate's wrapper averages the gradients over processes at the backward of a step's last
micro-batch (``no_sync`` before it), so the plain path serves as it is: each process takes
every world-size-th example, and the loop scales the loss so the averages add up.
"""

from __future__ import annotations

from instruct.parallel.base import Strategy


class DataParallel(Strategy):
    """Several processes, each with the whole model (``MULTI_CPU``, ``MULTI_GPU``, ...)."""
