"""Uncertainty for evaluation scores: a seeded bootstrap over prompts, and paired comparisons.

Every score is a ratio of per-prompt sums (:class:`instruct.eval.suite.Score`), so one
resampling scheme serves all of them: draw prompts with replacement, recompute the ratio,
take the percentiles. Two jobs scored on the same prompts are compared *paired*: the same
draw of prompts for both, so the interval is that of the difference, which is much narrower
than the two separate intervals suggest when the jobs agree on most prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _ratios(num: np.ndarray, den: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The ratio of sums for every resample (a row of prompt indices in ``draws``)."""
    dens = den[draws].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dens > 0, num[draws].sum(axis=1) / np.where(dens > 0, dens, 1), np.nan)


def _draws(n: int, samples: int, seed: int) -> np.ndarray:
    # One generator per call, seeded: the same scores give the same interval on any machine
    # (PCG64's stream is fixed across NumPy versions for integers()).
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_interval(
    num: Sequence[float],
    den: Sequence[float],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(num) / sum(den)`` over prompts.

    With no prompts the interval is ``(nan, nan)``; with one it has no width.
    """
    a, b = np.asarray(num, float), np.asarray(den, float)
    if len(a) != len(b):
        raise ValueError(f"num and den differ in length: {len(a)} != {len(b)}")
    if len(a) == 0 or b.sum() == 0:
        return (math.nan, math.nan)
    values = _ratios(a, b, _draws(len(a), samples, seed))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))


@dataclass
class Paired:
    """``a - b`` on the prompts both were scored on, with its bootstrap interval."""

    difference: float
    low: float
    high: float
    prompts: int  # the prompts both share, the ones compared
    # Prompts needed for the interval to exclude 0 at this difference, were the per-prompt
    # spread the same (the half-width shrinks as 1/sqrt(n)); None when the difference is 0.
    prompts_to_separate: int | None

    @property
    def tied(self) -> bool:
        """The interval of the difference contains 0: the data cannot tell the two apart."""
        return not (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "difference": self.difference,
            "ci": [self.low, self.high],
            "prompts": self.prompts,
            "tied": self.tied,
            "prompts_to_separate": self.prompts_to_separate,
        }


def paired_difference(
    a: tuple[Sequence[str], Sequence[float], Sequence[float]],
    b: tuple[Sequence[str], Sequence[float], Sequence[float]],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Paired:
    """Compare two jobs, each given as ``(prompt ids, num, den)``, on their shared prompts.

    The same resampled prompts are used for both sides, so what both get right or wrong
    together cancels. Raises ValueError when they share no prompt: such scores measure
    different things and must not be compared.
    """
    index_b = {key: i for i, key in enumerate(b[0])}
    pairs = [(i, index_b[key]) for i, key in enumerate(a[0]) if key in index_b]
    if not pairs:
        raise ValueError("the two jobs share no evaluation prompt; they cannot be compared")
    ia, ib = (np.asarray(p, dtype=np.int64) for p in zip(*pairs, strict=True))
    na, da = np.asarray(a[1], float)[ia], np.asarray(a[2], float)[ia]
    nb, db = np.asarray(b[1], float)[ib], np.asarray(b[2], float)[ib]
    diff = float(na.sum() / da.sum() - nb.sum() / db.sum())
    draws = _draws(len(pairs), samples, seed)
    values = _ratios(na, da, draws) - _ratios(nb, db, draws)
    tail = (1 - confidence) / 2 * 100
    lo, hi = (float(v) for v in np.nanpercentile(values, [tail, 100 - tail]))
    return Paired(diff, lo, hi, len(pairs), prompts_to_separate(diff, lo, hi, len(pairs)))


def prompts_to_separate(difference: float, low: float, high: float, prompts: int) -> int | None:
    """About how many prompts would make an interval of this width exclude 0.

    The half-width of a bootstrap interval falls as ``1/sqrt(n)``, so ``n`` prompts giving a
    half-width ``h`` need ``n * (h / |d|)^2`` for ``h`` to shrink to the difference ``d``.
    Already separated: ``prompts`` itself. No difference at all: None (no number of prompts
    separates two jobs that agree).
    """
    if difference == 0 or not math.isfinite(difference):
        return None
    if low > 0 or high < 0:
        return prompts
    half = (high - low) / 2
    return max(prompts, math.ceil(prompts * (half / abs(difference)) ** 2))
