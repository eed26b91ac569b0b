"""One process: the plain path of :class:`instruct.parallel.base.Strategy`, nothing added."""

from __future__ import annotations

from instruct.parallel.base import Strategy


class Single(Strategy):
    """One process on one device (Accelerate's ``NO``)."""
