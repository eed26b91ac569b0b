"""Where a run's time goes: its optimizer steps, and the work between them (validation,
samples, checkpoints). ``results.json`` and every resumable checkpoint report both, and the
split by step of the run (:data:`PHASES`) that the end-of-run summary prints."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# The steps of a run whose seconds the split reports, in the order they happen.
PHASES = ("load", "prepare", "train", "validate", "samples", "checkpoints", "eval")


@dataclass
class Clock:
    """Seconds of training and of the rest, summed over the run (a resume continues them)."""

    train_seconds: float = 0.0  # optimizer steps (and their logging) only
    eval_seconds: float = 0.0  # validation, samples and checkpoints: not training time
    split: dict[str, float] = field(default_factory=dict)  # seconds by phase (PHASES)

    def state(self) -> dict[str, Any]:
        split = {name: self.split[name] for name in PHASES if name in self.split}
        return {"train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "time_split": split}  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        self.train_seconds = state["train_seconds"]
        self.eval_seconds = state["eval_seconds"]
        for name, seconds in (state.get("time_split") or {}).items():  # none before it was kept
            self.split[name] = self.split.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Its seconds count towards ``name`` in the split (one of :data:`PHASES`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.split[name] = self.split.get(name, 0.0) + time.perf_counter() - start

    @contextmanager
    def training(self) -> Iterator[Callable[[], float]]:
        """Its seconds count as training; it gives a function of the seconds so far."""
        start = time.perf_counter()
        try:
            yield lambda: time.perf_counter() - start
        finally:
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            self.split["train"] = self.split.get("train", 0.0) + seconds

    @contextmanager
    def not_training(self) -> Iterator[None]:
        """Its seconds count as not training (``eval_seconds``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds += time.perf_counter() - start
