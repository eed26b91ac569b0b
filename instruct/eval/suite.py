"""What a suite is: a registered class that scores one model and returns per-prompt scores.

Suites are looked up by name in :data:`SUITES` (``eval.suites: [ifeval, judge]``), never
chosen by an if-chain. A suite gets an :class:`EvalContext`: the model under evaluation, its
tokenizer and template, and a ``generate`` function that answers conversations with that
model exactly as it was trained (the shared batched, greedy path). It returns a
:class:`SuiteResult` whose scores are ratios of per-prompt sums, so that a bootstrap over
prompts and a paired comparison of two jobs on the same prompts need nothing suite-specific.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from instruct.data.templates import Message

# name -> suite class; filled by @register_suite as each suite module is imported
SUITES: dict[str, type[Suite]] = {}


def register_suite(cls: type[Suite]) -> type[Suite]:
    """Class decorator: make ``cls`` available as ``eval.suites: [<cls.name>]``."""
    if cls.name in SUITES and SUITES[cls.name] is not cls:
        raise ValueError(f"two eval suites named {cls.name!r}: {SUITES[cls.name]} and {cls}")
    SUITES[cls.name] = cls
    return cls


@dataclass
class Score:
    """One figure as a ratio of per-prompt sums: ``sum(num) / sum(den)``.

    A prompt-level accuracy has ``den = 1`` for every prompt; an instruction-level accuracy
    has ``num`` = instructions followed and ``den`` = instructions in that prompt. Resampling
    prompts keeps each prompt's pair together, which is the right bootstrap for both.
    """

    num: list[float]
    den: list[float]
    higher_is_better: bool = True

    @property
    def value(self) -> float:
        total = sum(self.den)
        return sum(self.num) / total if total else float("nan")


@dataclass
class SuiteResult:
    """What one suite measured on one model."""

    suite: str
    ids: list[str]  # one per prompt, aligned with every Score's lists; pairs jobs' prompts
    scores: dict[str, Score]
    headline: str | None  # the key in ``scores`` a ranking uses; None: nothing to rank by
    rows: list[dict[str, Any]] = field(default_factory=list)  # per prompt: prompt, reply, ...
    info: dict[str, Any] = field(default_factory=dict)  # counts, settings, what was skipped


@dataclass
class EvalContext:
    """What a suite may use to evaluate one model."""

    label: str  # "tuned" or "base"
    model: Any
    tokenizer: Any
    template: Any
    # Replies to conversations (each ends with a user turn), in order: the shared batched,
    # greedy generation path with the template the model was trained on.
    generate: Callable[[Sequence[Sequence[Message]]], list[str]]
    out_dir: Path  # where a suite may keep files (caches, raw responses)
    # The base model's replies to the same conversations (for judges comparing against the
    # base model); None where no base model is available.
    base_generate: Callable[[Sequence[Sequence[Message]]], list[str]] | None = None
    run_cfg: Any = None  # the training run's config (data, model), when there is one


class Suite(ABC):
    """One kind of evaluation. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the whole eval config; each suite reads its own section

    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs of this suite comparable (file hash, subset, settings); part
        of the key under which a base model's scores are cached."""
        return {}

    @abstractmethod
    def run(self, ctx: EvalContext) -> SuiteResult:
        """Evaluate ``ctx.model``; the result's lists hold one entry per prompt."""
