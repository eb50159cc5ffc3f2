"""Is one model's AP beyond the seed-to-seed noise of a baseline trained with several seeds?

Why this exists: at the demo's budgets a detector's AP moves by about as much between two training seeds as
between two decoders (issue 13 measured 0.017-0.032 AP for ``fpn-fcos`` over four seeds at 110 steps), so a
table of one-seed APs invites a ranking it cannot support. The demo therefore trains the baseline with several
seeds and states, in one sentence, whether the best searched decoder's AP lies outside that noise.

The rule, stated once here: the baseline's APs over ``n`` seeds give a mean and a sample standard deviation
``s``. A single run of another decoder with the same noise differs from that mean by a quantity whose standard
deviation is ``s * sqrt(1 + 1/n)`` (its own run's noise plus the mean's). The difference is *beyond the noise*
when it exceeds ``k`` times that (``k = 2``: about a 95 % two-sided band for normal noise). This assumes the
searched decoder's seed noise is like the baseline's — the fidelity study found it so (its seed spread per
decoder: ``benchmarks/results/proxy_fidelity.md``). With fewer than two baseline seeds there is no spread and the
verdict says so instead of guessing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NOISE_MULTIPLIER", "BaselineNoise", "NoiseVerdict", "baseline_noise", "judge"]

#: ``k``: a difference counts as beyond the noise above ``k`` standard deviations of the difference.
NOISE_MULTIPLIER = 2.0


@dataclass(frozen=True)
class BaselineNoise:
    """One architecture trained with several seeds at a fixed budget: its APs and their spread."""

    name: str
    seeds: tuple[int, ...]
    aps: tuple[float, ...]
    mean: float
    std: float  # sample std (ddof 1); NaN with fewer than two seeds

    def margin(self, k: float = NOISE_MULTIPLIER) -> float:
        """The smallest difference from :attr:`mean` that one more run must show to be beyond the noise."""
        n = len(self.aps)
        return k * self.std * math.sqrt(1.0 + 1.0 / n) if n >= 2 else math.nan

    def in_sigmas(self, ap: float) -> float:
        """``(ap - mean) / std``: how many seed standard deviations ``ap`` lies from the baseline's mean."""
        return (ap - self.mean) / self.std if self.std > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "aps": list(self.aps), "margin": self.margin()}


def baseline_noise(name: str, runs: Sequence[tuple[int, float]]) -> BaselineNoise:
    """:class:`BaselineNoise` of ``runs``: (seed, AP) pairs of one architecture at one budget."""
    if not runs:
        raise ValueError(f"{name}: no runs to measure a seed spread from")
    seeds = tuple(int(seed) for seed, _ in runs)
    aps = tuple(float(ap) for _, ap in runs)
    std = statistics.stdev(aps) if len(aps) >= 2 else math.nan
    return BaselineNoise(name, seeds, aps, statistics.fmean(aps), std)


@dataclass(frozen=True)
class NoiseVerdict:
    """The comparison of one model's AP with a baseline's seed spread, and the sentence that states it."""

    model: str
    ap: float
    baseline: BaselineNoise
    difference: float  # ap - baseline mean
    margin: float  # NaN: no spread measured
    outcome: str  # "better", "worse", "within-noise" or "no-spread"
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "AP": self.ap, "baseline": self.baseline.to_dict(),
                "difference": self.difference, "margin": self.margin, "outcome": self.outcome,
                "sentence": self.sentence}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def judge(model: str, ap: float, baseline: BaselineNoise, *, k: float = NOISE_MULTIPLIER) -> NoiseVerdict:
    """Whether ``model``'s AP (one run) beat ``baseline`` beyond its seed noise; APs are COCO fractions."""
    difference = ap - baseline.mean
    margin = baseline.margin(k)
    n = len(baseline.aps)
    base = (f"{baseline.name} AP {_pct(baseline.mean)} ± {_pct(baseline.std)} % over {n} seeds"
            if n >= 2 else f"{baseline.name} AP {_pct(baseline.mean)} % from one seed")
    head = f"{model} (AP {_pct(ap)} %) vs {base}"
    if not math.isfinite(margin):
        outcome = "no-spread"
        sentence = f"{head}: no seed spread was measured, so no verdict beyond the noise is possible."
    elif difference > margin:
        outcome = "better"
        sentence = (f"{head}: the searched decoder beat {baseline.name} beyond the noise "
                    f"(+{_pct(difference)} points, more than the {_pct(margin)}-point noise margin).")
    elif difference < -margin:
        outcome = "worse"
        sentence = (f"{head}: {baseline.name} beat the searched decoder beyond the noise "
                    f"({_pct(difference)} points, more than the {_pct(margin)}-point noise margin).")
    else:
        outcome = "within-noise"
        sign = "+" if difference >= 0 else ""
        sentence = (f"{head}: the searched decoder did not beat {baseline.name} beyond the noise "
                    f"({sign}{_pct(difference)} points, inside the {_pct(margin)}-point noise margin).")
    return NoiseVerdict(model, ap, baseline, difference, margin, outcome, sentence)
