"""The searched-vs-baseline verdict against a seed spread, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from nasfcos.analysis.seed_noise import baseline_noise, judge

# APs 0.02 / 0.03 / 0.04 over seeds 0-2: mean 0.03, sample std 0.01, so one more run minus the mean has std
# 0.01 * sqrt(1 + 1/3) and the margin at k = 2 is 0.0230940...
NOISE = baseline_noise("fpn-fcos", [(0, 0.02), (1, 0.03), (2, 0.04)])
MARGIN = 2 * 0.01 * math.sqrt(4 / 3)


def test_baseline_noise_is_the_sample_spread() -> None:
    assert NOISE.seeds == (0, 1, 2)
    assert NOISE.mean == pytest.approx(0.03)
    assert NOISE.std == pytest.approx(0.01)
    assert NOISE.margin() == pytest.approx(MARGIN)
    assert NOISE.in_sigmas(0.05) == pytest.approx(2.0)
    assert NOISE.to_dict()["aps"] == [0.02, 0.03, 0.04]


@pytest.mark.parametrize(("ap", "outcome", "phrase"), [
    (0.06, "better", "beat fpn-fcos beyond the noise"),          # +0.030 > 0.0231
    (0.05, "within-noise", "did not beat fpn-fcos beyond the noise"),  # +0.020 < 0.0231
    (0.01, "within-noise", "did not beat fpn-fcos beyond the noise"),  # -0.020
    (0.00, "worse", "fpn-fcos beat the searched decoder beyond the noise"),  # -0.030
])
def test_verdict_against_the_margin(ap: float, outcome: str, phrase: str) -> None:
    verdict = judge("searched-1", ap, NOISE)
    assert verdict.outcome == outcome
    assert verdict.difference == pytest.approx(ap - 0.03)
    assert verdict.margin == pytest.approx(MARGIN)
    assert phrase in verdict.sentence
    assert "3.0 ± 1.0 % over 3 seeds" in verdict.sentence and f"AP {100 * ap:.1f} %" in verdict.sentence
    assert verdict.to_dict()["outcome"] == outcome


def test_one_seed_gives_no_verdict() -> None:
    single = baseline_noise("fpn-fcos", [(0, 0.03)])
    assert math.isnan(single.std) and math.isnan(single.margin())
    verdict = judge("searched-1", 0.9, single)
    assert verdict.outcome == "no-spread" and "no seed spread" in verdict.sentence
    with pytest.raises(ValueError, match="no runs"):
        baseline_noise("fpn-fcos", [])


def test_a_wider_spread_needs_a_larger_difference() -> None:
    wide = baseline_noise("fpn-fcos", [(0, 0.00), (1, 0.03), (2, 0.06)])  # std 0.03
    assert judge("s", 0.06, NOISE).outcome == "better"
    assert judge("s", 0.06, wide).outcome == "within-noise"
