"""``report.metric``: which figure of a run's ``results.json`` ranks it, and which way.

``auto`` is the eval suites' headline score when the run was evaluated (higher is better),
else the best validation loss (lower is better). A named figure is ``<suite>/<figure>``
(``ifeval/inst_loose``, ``judge/win_rate``) or ``val_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

VAL_LOSS = "val_loss"


@dataclass(frozen=True)
class Metric:
    name: str  # "val_loss" or "<suite>/<figure>"
    higher_is_better: bool

    @property
    def direction(self) -> str:
        """As Hydra's Optuna sweeper spells it."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def is_eval(self) -> bool:
        return self.name != VAL_LOSS


def resolve(metric: str, results: dict[str, Any] | None) -> Metric:
    """The metric ``metric`` names for a run with these results (``auto`` decided here)."""
    evaluation = (results or {}).get("eval") or {}
    if metric == "auto":
        top = evaluation.get("headline")
        if top:
            return Metric(top["metric"], bool(top.get("higher_is_better", True)))
        return Metric(VAL_LOSS, False)
    if metric == VAL_LOSS:
        return Metric(VAL_LOSS, False)
    suite, _, figure = metric.partition("/")
    if not figure:
        raise ValueError(
            f"report.metric={metric!r}: expected auto, val_loss or <suite>/<figure> "
            "such as ifeval/prompt_strict"
        )
    score = evaluation.get("tuned", {}).get(suite, {}).get("scores", {}).get(figure)
    return Metric(metric, bool(score.get("higher_is_better", True)) if score else True)


def value_of(metric: Metric, results: dict[str, Any] | None, label: str = "tuned") -> float:
    """The run's value of ``metric`` (NaN when the run lacks it)."""
    if not results:
        return math.nan
    if metric.name == VAL_LOSS:
        loss = results.get("best_val_loss")
        return float(loss) if isinstance(loss, int | float) else math.nan
    score = interval_of(metric, results, label)
    return score[0] if score else math.nan


def interval_of(
    metric: Metric, results: dict[str, Any], label: str = "tuned"
) -> tuple[float, float, float] | None:
    """``(value, low, high)`` of an eval figure for ``label`` (tuned or base), or None."""
    suite, _, figure = metric.name.partition("/")
    part = (results.get("eval") or {}).get(label, {}).get(suite)
    score = (part or {}).get("scores", {}).get(figure)
    if not score:
        return None
    low, high = score.get("ci", [math.nan, math.nan])
    return float(score["value"]), float(low), float(high)


def sweeper_value(metric: Metric, results: dict[str, Any]) -> float:
    """What ``instruct.run``'s main returns: the metric's value, NaN mapped to the worst
    value so a failed evaluation never wins a search."""
    value = value_of(metric, results)
    if math.isnan(value):
        return -math.inf if metric.higher_is_better else math.inf
    return value
