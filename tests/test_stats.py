"""Paired statistics (kvcompress.evaluation.stats): hand-computed intervals, A/A, a planted effect, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcompress.evaluation.stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Comparison,
    paired_ratio,
    verdict_greater,
    verdict_less,
    verdict_within,
)


def test_t_interval_on_a_hand_computed_example() -> None:
    a = np.array([[2.0, 3.0, 4.0, 5.0]])
    b = a + np.array([[0.1, 0.3, 0.2, 0.2]])  # differences: mean 0.2, sd 0.0816497, n 4
    cmp = paired_ratio(a, b, method="t")
    half = 3.182446305284263 * 0.08164965809277261 / 2  # t(0.975, 3) * sd / sqrt(4)
    assert cmp.ratio == pytest.approx(math.exp(0.2))
    assert cmp.ci == pytest.approx((math.exp(0.2 - half), math.exp(0.2 + half)))
    assert (cmp.n_windows, cmp.n_seeds, cmp.method) == (4, (1, 1), "t")


def test_constant_difference_gives_a_point_interval_by_bootstrap() -> None:
    a = np.random.default_rng(0).normal(5, 1, (1, 50))  # one seed: only the windows are resampled
    cmp = paired_ratio(a, a + 0.1)
    assert cmp.ci == pytest.approx((math.exp(0.1), math.exp(0.1)))
    # With two seeds, the seeds are resampled too: the spread between seeds widens the interval.
    two = np.random.default_rng(0).normal(5, 1, (2, 50))
    wide = paired_ratio(two, two + 0.1)
    assert wide.ci[0] < math.exp(0.1) < wide.ci[1] and wide.per_seed == pytest.approx([math.exp(0.1)] * 2)


def test_a_a_comparison_includes_one() -> None:
    rng = np.random.default_rng(1)
    text = rng.normal(5, 0.5, 400)  # per-window difficulty, shared by every run
    a = text + rng.normal(0, 0.05, (2, 400))  # two seeds of one configuration...
    b = text + rng.normal(0, 0.05, (2, 400))  # ...and two more seeds of the same configuration
    for method in ("bootstrap", "t"):
        lo, hi = paired_ratio(a, b, method=method).ci
        assert lo < 1 < hi, method


def test_a_planted_effect_is_detected() -> None:
    rng = np.random.default_rng(2)
    text = rng.normal(5, 0.5, 400)
    a = text + rng.normal(0, 0.05, (2, 400))
    b = text + 0.05 + rng.normal(0, 0.05, (2, 400))  # B is 5% worse in PPL
    cmp = paired_ratio(a, b)
    assert 1.0 < cmp.ci[0] < cmp.ratio < cmp.ci[1]
    assert verdict_greater(cmp, 1.0) == REPRODUCED and verdict_less(cmp, 1.0) == NOT_REPRODUCED


def test_verdicts_have_three_outcomes() -> None:
    def at(lo: float, hi: float, level: float = 0.95) -> Comparison:
        return Comparison((lo + hi) / 2, (lo, hi), level, 100, (1, 1), "t")

    assert verdict_greater(at(1.1, 1.3), 1.0) == REPRODUCED
    assert verdict_greater(at(0.9, 1.2), 1.0) == INCONCLUSIVE
    assert verdict_greater(at(0.8, 0.95), 1.0) == NOT_REPRODUCED
    assert verdict_less(at(0.9, 1.05), 1.0) == INCONCLUSIVE
    # TOST, margin 2%: the 90% interval inside [1/1.02, 1.02] reproduces; the 95% interval wholly outside does not.
    assert verdict_within(at(0.99, 1.015, 0.9), at(0.985, 1.018), 0.02) == REPRODUCED
    assert verdict_within(at(1.01, 1.05, 0.9), at(1.005, 1.06), 0.02) == INCONCLUSIVE
    assert verdict_within(at(1.04, 1.08, 0.9), at(1.03, 1.09), 0.02) == NOT_REPRODUCED


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="different numbers of windows"):
        paired_ratio(np.zeros((1, 4)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        paired_ratio(np.array([[1.0, np.nan, 2.0]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="method must be one of"):
        paired_ratio(np.ones((1, 3)), np.ones((1, 3)), method="z")
