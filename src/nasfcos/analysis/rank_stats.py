"""Rank agreement between two scorings of the same models: Kendall's tau-b, Spearman's rho, bootstrap intervals,
top-k overlap, and the seed-to-seed spread of a reference (numpy only).

Why these: a proxy is only useful to a search if it *orders* decoders the way full training does; its scale
does not matter (minus a loss and an AP live on different scales). Kendall's tau-b counts concordant minus
discordant pairs, normalised for ties (the paper's Fig. 7 question in one number); Spearman's rho is the
Pearson correlation of the ranks (ties get their average rank). Both are the textbook definitions
(scipy.stats.kendalltau's default variant "b" and scipy.stats.spearmanr); scipy is not a dependency of this
project, so they are written out here for the small n (10-30 models) of a fidelity study: O(n^2) is fine.

With ~15 models a single tau is noisy, so every coefficient comes with a **paired percentile bootstrap**
interval: resample the models with replacement (each keeps its pair of scores), recompute, take the
``(1-level)/2`` and ``(1+level)/2`` quantiles. Resamples whose coefficient is undefined (every drawn model has the
same score) are dropped; the count kept is reported. The interval narrows roughly as ``1/sqrt(n)``.

``NaN`` means "undefined" everywhere (a constant scoring has no ranking), never an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "SeedSpread",
    "average_ranks",
    "bootstrap_interval",
    "kendall_tau",
    "seed_spread",
    "spearman_rho",
    "top_k_overlap",
]


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the two scorings have different lengths ({a.size} and {b.size})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite (leave failed models out before ranking)")
    return a, b


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: ``(C - D) / sqrt((n0 - n1) (n0 - n2))`` over all pairs; ``n0 = n(n-1)/2``, ``n1`` / ``n2``
    the pairs tied in ``x`` / ``y``. 1 for the same order, -1 for the reversed one, NaN when either is constant."""
    a, b = _pair(x, y)
    n = a.size
    if n < 2:
        return math.nan
    i, j = np.triu_indices(n, k=1)
    sx = np.sign(a[i] - a[j])
    sy = np.sign(b[i] - b[j])
    untied_x = float(np.count_nonzero(sx))
    untied_y = float(np.count_nonzero(sy))
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float(np.sum(sx * sy) / math.sqrt(untied_x * untied_y))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values`` (ascending); tied values share the average of the ranks they span."""
    a = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=np.float64)
    sorted_values = a[order]
    start = 0
    while start < a.size:
        stop = start + 1
        while stop < a.size and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN when either scoring is constant."""
    a, b = _pair(x, y)
    if a.size < 2:
        return math.nan
    ra = average_ranks(a) - (a.size + 1) / 2.0
    rb = average_ranks(b) - (b.size + 1) / 2.0
    den = math.sqrt(float(np.sum(ra * ra)) * float(np.sum(rb * rb)))
    return math.nan if den == 0 else float(np.sum(ra * rb) / den)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (``kept`` resamples had a defined value)."""

    value: float
    low: float
    high: float
    level: float
    kept: int
    resamples: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready numbers (NaN stays NaN; the writers print it as n/a)."""
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level, "kept": self.kept,
                "resamples": self.resamples}


def bootstrap_interval(
    stat: Callable[[np.ndarray, np.ndarray], float],
    x: Sequence[float],
    y: Sequence[float],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``stat(x, y)`` and its paired percentile bootstrap interval (module docstring); deterministic in ``seed``."""
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1 (got {resamples})")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1) (got {level})")
    a, b = _pair(x, y)
    value = float(stat(a, b))
    n = a.size
    if n < 2:
        return Interval(value, math.nan, math.nan, level, 0, resamples)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    values = np.array([stat(a[idx], b[idx]) for idx in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(value, math.nan, math.nan, level, 0, resamples)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(value, float(low), float(high), level, int(values.size), resamples)


def top_k_overlap(reference: Mapping[str, float], proxy: Mapping[str, float], k: int) -> int | None:
    """How many of the ``k`` best models by ``reference`` are also among the ``k`` best by ``proxy`` (higher is
    better in both). Only models scored by both count. ``None`` when either ranking ties across its k-th place
    (e.g. a proxy that scores every model 0): its k best are then not defined, and breaking the tie by name would
    report an overlap that only reflects the names."""
    if k < 1:
        raise ValueError(f"k: expected >= 1 (got {k})")
    names = sorted(set(reference) & set(proxy))

    def best(scores: Mapping[str, float]) -> set[str] | None:
        ordered = sorted(names, key=lambda name: -float(scores[name]))
        if len(ordered) > k and float(scores[ordered[k - 1]]) == float(scores[ordered[k]]):
            return None
        return set(ordered[:k])

    top_reference, top_proxy = best(reference), best(proxy)
    if top_reference is None or top_proxy is None:
        return None
    return len(top_reference & top_proxy)


@dataclass(frozen=True)
class SeedSpread:
    """Seed-to-seed spread of a reference metric against its spread across models.

    ``per_model``: name -> (mean, sample std, min, max, seeds). ``pooled_std``: the square root of the mean of the
    per-model variances (the noise of one training run). ``across_std`` / ``across_range``: the sample std and
    range over models of one score each. ``score_std``: the noise of one such score — ``pooled_std`` when a score
    is one run, ``pooled_std / sqrt(k)`` when it is the mean of k runs. ``ratio = across_std / score_std`` (NaN
    when undefined): well above 1 means the reference separates models by more than its own seed noise.
    """

    per_model: dict[str, tuple[float, float, float, float, int]]
    pooled_std: float
    across_std: float
    across_range: float
    ratio: float
    score_std: float = math.nan


def seed_spread(per_seed: Mapping[str, Sequence[float]], across: Sequence[float], *,
                runs_per_score: int = 1) -> SeedSpread:
    """:class:`SeedSpread` of ``per_seed`` (model -> scores over seeds) and ``across`` (one score per model, each the
    mean of ``runs_per_score`` runs)."""
    per_model: dict[str, tuple[float, float, float, float, int]] = {}
    variances: list[float] = []
    for name, scores in per_seed.items():
        values = np.asarray(scores, dtype=np.float64)
        if values.size == 0:
            continue
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        per_model[name] = (float(values.mean()), std, float(values.min()), float(values.max()), int(values.size))
        if values.size > 1:
            variances.append(std * std)
    pooled = math.sqrt(sum(variances) / len(variances)) if variances else math.nan
    values = np.asarray(across, dtype=np.float64)
    across_std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    across_range = float(values.max() - values.min()) if values.size else math.nan
    if runs_per_score < 1:
        raise ValueError(f"runs_per_score must be >= 1 (got {runs_per_score})")
    score_std = pooled / math.sqrt(runs_per_score)
    ratio = (across_std / score_std if score_std and math.isfinite(score_std) and math.isfinite(across_std)
             else math.nan)
    return SeedSpread(per_model, pooled, across_std, across_range, ratio, score_std)
