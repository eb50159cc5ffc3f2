"""Rank statistics of the fidelity study against hand-computed answers (scipy is not a dependency; the expected
values below are worked out by hand in the comments and agree with scipy.stats.kendalltau / spearmanr)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nasfcos.analysis.rank_stats import (
    average_ranks,
    bootstrap_interval,
    kendall_tau,
    seed_spread,
    spearman_rho,
    top_k_overlap,
)


def test_identical_and_reversed_rankings() -> None:
    x = [0.1, 0.5, 0.2, 0.9, 0.3]
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert spearman_rho(x, x) == pytest.approx(1.0)
    # Any strictly increasing transform keeps the order.
    assert kendall_tau(x, [math.exp(10 * v) for v in x]) == pytest.approx(1.0)
    assert kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman_rho(x, [-v for v in x]) == pytest.approx(-1.0)


def test_hand_computed_case_with_ties() -> None:
    x = [1, 2, 3, 4, 5]
    y = [1, 3, 2, 4, 4]
    # 10 pairs: 8 concordant, 1 discordant (3 vs 2), 1 tied in y (4, 4); tau_b = (8 - 1) / sqrt(10 * 9).
    assert kendall_tau(x, y) == pytest.approx(7 / math.sqrt(90))  # scipy: 0.7378647873726218
    # Ranks of y: 1, 3, 2, 4.5, 4.5; centred dot product 8.5, norms^2 10 and 9.5.
    assert spearman_rho(x, y) == pytest.approx(8.5 / math.sqrt(95))  # scipy: 0.8720815992723809
    assert list(average_ranks([10, 20, 20, 30])) == [1.0, 2.5, 2.5, 4.0]
    assert list(average_ranks([5, 5, 5])) == [2.0, 2.0, 2.0]


def test_undefined_cases_are_nan_and_bad_input_raises() -> None:
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_rho([1, 2, 3], [4, 4, 4]))
    assert math.isnan(kendall_tau([1], [2]))
    with pytest.raises(ValueError, match="lengths"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        spearman_rho([1, 2, float("nan")], [1, 2, 3])


def _noisy(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    x = np.arange(n, dtype=float)
    return x, x + rng.normal(0, n / 3, size=n)


@pytest.mark.parametrize("stat", [kendall_tau, spearman_rho])
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n(stat) -> None:
    widths = []
    for n in (12, 48, 192):
        x, y = _noisy(n)
        interval = bootstrap_interval(stat, x, y, resamples=500, seed=0)
        assert interval.value == pytest.approx(stat(x, y))
        assert interval.low <= interval.value <= interval.high
        assert interval.kept == 500
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    # Deterministic in the seed.
    x, y = _noisy(12)
    assert bootstrap_interval(stat, x, y, resamples=200, seed=5) == bootstrap_interval(stat, x, y, resamples=200,
                                                                                        seed=5)


def test_bootstrap_drops_undefined_resamples() -> None:
    # Two models: a resample drawing the same model twice has no ranking; those are dropped, not counted.
    interval = bootstrap_interval(kendall_tau, [1.0, 2.0], [1.0, 2.0], resamples=400, seed=0)
    assert interval.value == 1.0
    assert 0 < interval.kept < 400
    assert interval.low == interval.high == 1.0


def test_top_k_overlap_hand_cases() -> None:
    reference = {"a": 4, "b": 3, "c": 2, "d": 1}
    proxy = {"a": 1, "b": 4, "c": 3, "d": 2}
    assert top_k_overlap(reference, proxy, 2) == 1  # {a, b} vs {b, c}
    assert top_k_overlap(reference, proxy, 3) == 2  # {a, b, c} vs {b, c, d}
    assert top_k_overlap(reference, reference, 3) == 3
    # A ranking tied across its k-th place has no k best: no overlap to report (not one that depends on names).
    assert top_k_overlap({"x": 1, "y": 1}, {"x": 0, "y": 5}, 1) is None
    assert top_k_overlap(reference, {"a": 0, "b": 0, "c": 0, "d": 0}, 2) is None  # a constant proxy
    assert top_k_overlap(reference, {"a": 5, "b": 5, "c": 1, "d": 0}, 2) == 2  # ties inside the top k are fine
    assert top_k_overlap(reference, {"a": 5, "b": 1, "c": 1, "d": 1}, 1) == 1  # and below it
    # Only models both scored count.
    assert top_k_overlap({"a": 3, "b": 2, "z": 9}, {"a": 3, "b": 2}, 1) == 1


def test_seed_spread_hand_case() -> None:
    spread = seed_spread({"p": [0.10, 0.12, 0.14], "q": [0.20, 0.20]}, [0.10, 0.20, 0.40])
    mean, std, low, high, n = spread.per_model["p"]
    assert (mean, low, high, n) == (pytest.approx(0.12), 0.10, 0.14, 3)
    assert std == pytest.approx(0.02)
    assert spread.per_model["q"][1] == pytest.approx(0.0)
    assert spread.pooled_std == pytest.approx(math.sqrt((0.02**2 + 0.0) / 2))
    assert spread.across_std == pytest.approx(np.std([0.1, 0.2, 0.4], ddof=1))
    assert spread.across_range == pytest.approx(0.30)
    assert spread.ratio == pytest.approx(spread.across_std / spread.pooled_std)
