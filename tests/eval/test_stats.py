"""Bootstrap intervals and paired comparisons on constructed results with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from instruct.eval.stats import bootstrap_interval, paired_difference, prompts_to_separate


def test_interval_of_a_constant_score_has_no_width():
    assert bootstrap_interval([1.0] * 50, [1.0] * 50) == (1.0, 1.0)
    assert bootstrap_interval([0.0] * 50, [1.0] * 50) == (0.0, 0.0)


def test_interval_covers_the_value_and_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    passed = (rng.random(400) < 0.4).astype(float)
    lo, hi = bootstrap_interval(passed, np.ones(400), samples=4000)
    p = passed.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / 400)  # the textbook interval of a proportion
    assert lo < p < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)


def test_interval_is_seeded_and_depends_on_the_seed():
    num, den = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1], [1] * 10
    assert bootstrap_interval(num, den, seed=3) == bootstrap_interval(num, den, seed=3)
    draws = {bootstrap_interval(num, den, samples=50, seed=s) for s in range(5)}
    assert len(draws) > 1


def test_ratio_of_sums_resamples_prompts_whole():
    # Instruction level: prompt 1 followed 2 of 2, prompt 2 followed 0 of 3 -> 2/5.
    lo, hi = bootstrap_interval([2, 0], [2, 3], samples=2000)
    assert 0.0 <= lo < 0.4 < hi <= 1.0


def test_empty_results_give_nan_not_a_crash():
    lo, hi = bootstrap_interval([], [])
    assert math.isnan(lo) and math.isnan(hi)


def test_two_identical_jobs_are_tied():
    ids = [f"p{i}" for i in range(100)]
    scores = list((np.arange(100) % 3 == 0).astype(float))
    paired = paired_difference((ids, scores, [1] * 100), (ids, scores, [1] * 100))
    assert paired.difference == 0 and paired.tied
    assert (paired.low, paired.high) == (0.0, 0.0)
    assert paired.prompts_to_separate is None  # no number of prompts separates equals


def test_a_job_that_wins_on_every_prompt_is_not_tied():
    ids = [f"p{i}" for i in range(30)]
    paired = paired_difference((ids, [1] * 30, [1] * 30), (ids, [0] * 30, [1] * 30))
    assert paired.difference == 1 and not paired.tied
    assert paired.prompts_to_separate == 30


def test_pairing_is_by_prompt_id_not_position():
    a = (["x", "y", "z"], [1, 0, 1], [1, 1, 1])
    b = (["z", "x", "y"], [1, 1, 0], [1, 1, 1])  # the same answers, in another order
    paired = paired_difference(a, b)
    assert paired.difference == 0 and paired.tied and paired.prompts == 3


def test_paired_is_tighter_than_separate_intervals_when_jobs_agree():
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:12]] = 1  # wins 12 more prompts, loses none
    ids = [str(i) for i in range(200)]
    paired = paired_difference((ids, better, [1] * 200), (ids, base, [1] * 200))
    assert not paired.tied  # separated, though the two separate intervals overlap
    lo_a, hi_a = bootstrap_interval(better, [1] * 200)
    lo_b, hi_b = bootstrap_interval(base, [1] * 200)
    assert lo_a < hi_b


def test_a_small_difference_needs_more_prompts_to_separate():
    # 100 prompts: a wins 10 that b loses and loses 8 that b wins: +0.02, inside the noise.
    a, b = np.zeros(100), np.zeros(100)
    a[:10], b[10:18] = 1, 1
    ids = [str(i) for i in range(100)]
    paired = paired_difference((ids, a, [1] * 100), (ids, b, [1] * 100))
    assert paired.difference == pytest.approx(0.02) and paired.tied
    assert paired.prompts_to_separate > 1000  # the interval is ~ +-0.12 wide


def test_jobs_sharing_no_prompt_cannot_be_compared():
    with pytest.raises(ValueError, match="share no evaluation prompt"):
        paired_difference((["a"], [1], [1]), (["b"], [1], [1]))


def test_prompts_to_separate_scales_with_the_square_of_the_width():
    assert prompts_to_separate(0.05, -0.05, 0.15, 100) == 400  # half-width 0.1 = 2 x 0.05
    assert prompts_to_separate(0.1, 0.02, 0.18, 100) == 100  # already separated
