"""Where a run's time goes: its optimizer steps, and the work between them (validation,
samples, checkpoints). ``results.json`` and every resumable checkpoint report both."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Clock:
    """Seconds of training and of the rest, summed over the run (a resume continues them)."""

    train_seconds: float = 0.0  # optimizer steps (and their logging) only
    eval_seconds: float = 0.0  # validation, samples and checkpoints: not training time

    def state(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}

    def restore(self, state: dict[str, Any]) -> None:
        self.train_seconds = state["train_seconds"]
        self.eval_seconds = state["eval_seconds"]

    @contextmanager
    def training(self) -> Iterator[Callable[[], float]]:
        """Its seconds count as training; it gives a function of the seconds so far."""
        start = time.perf_counter()
        try:
            yield lambda: time.perf_counter() - start
        finally:
            self.train_seconds += time.perf_counter() - start

    @contextmanager
    def not_training(self) -> Iterator[None]:
        """Its seconds count as not training (``eval_seconds``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds += time.perf_counter() - start
