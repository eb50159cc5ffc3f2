"""The optional cost-aware reward (MnasNet's soft constraint, made sign-safe) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from nasfcos.config import config_from_dict
from nasfcos.errors import UserError
from nasfcos.search.cost_reward import CostRewardConfig, apply_cost_reward, cost_aware_reward
from nasfcos.search.results import EvaluationResult


def test_hand_values_for_both_signs() -> None:
    # Twice the target cost, weight 0.07: factor 2 ** 0.07 = 1.04971...
    factor = 2 ** 0.07
    assert cost_aware_reward(0.4, 2.0, 1.0, 0.07) == pytest.approx(0.4 / factor)  # MnasNet: 0.4 * 2 ** -0.07
    assert cost_aware_reward(-6.0, 2.0, 1.0, 0.07) == pytest.approx(-6.0 * factor)
    assert cost_aware_reward(-6.0, 1.0, 1.0, 0.07) == -6.0 and cost_aware_reward(0.4, 3.0, 3.0, 0.5) == 0.4
    assert cost_aware_reward(-6.0, 0.5, 1.0, 0.07) == pytest.approx(-6.0 / factor)  # cheaper than target: better
    assert cost_aware_reward(-6.0, 5.0, 1.0, 0.0) == -6.0  # weight 0: the paper's reward


@pytest.mark.parametrize("reward", [0.3, -4.2])
def test_costlier_is_always_worse(reward: float) -> None:
    values = [cost_aware_reward(reward, cost, 1.0, 0.07) for cost in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 5


def test_apply_keeps_the_raw_reward_and_leaves_failures_alone() -> None:
    cfg = CostRewardConfig(enabled=True, target=0.5, weight=0.1)
    result = EvaluationResult(reward=-5.0, gmacs=1.0)
    out = apply_cost_reward(result, cfg)
    assert out.reward == pytest.approx(-5.0 * 2 ** 0.1)
    assert out.metrics["raw_reward"] == -5.0 and out.metrics["cost_factor"] == pytest.approx(2 ** 0.1)
    assert out.gmacs == 1.0
    assert apply_cost_reward(result, CostRewardConfig()) is result  # off by default
    failed = EvaluationResult.failure("RuntimeError: boom")
    assert apply_cost_reward(failed, cfg) is failed
    no_cost = EvaluationResult(reward=-5.0)
    assert apply_cost_reward(no_cost, cfg) is no_cost
    latency = CostRewardConfig(enabled=True, metric="latency_ms", target=10.0, weight=0.07)
    timed = EvaluationResult(reward=0.2, metrics={"latency_ms": 20.0})
    assert apply_cost_reward(timed, latency).reward == pytest.approx(0.2 / 2 ** 0.07)


def test_config_mistakes_are_user_errors() -> None:
    with pytest.raises(UserError, match="target"):
        config_from_dict(CostRewardConfig, {"enabled": True, "target": 0}, source="x.yaml")
    assert config_from_dict(CostRewardConfig, {"enabled": True}, source="x").target is None  # = target_arch's cost
    with pytest.raises(UserError, match="weight"):
        config_from_dict(CostRewardConfig, {"weight": -1}, source="x.yaml")
    with pytest.raises(UserError, match="metric"):
        config_from_dict(CostRewardConfig, {"metric": "flops"}, source="x.yaml")
    assert math.isclose(config_from_dict(CostRewardConfig, {"enabled": True, "target": 2}, source="x").target, 2.0)
