"""A cost-aware search reward (issue 13 item 4; off by default, the paper's reward stays the default), torch-free.

Why: at equal MACs the searched decoders run 1.9-2.5x slower than ``fpn-fcos`` on the CPU (separable and
deformable convs at strides 4-8 are memory-bound), and the paper's reward (minus the meta-val loss) cannot see
that. MnasNet's soft constraint multiplies the accuracy reward by ``(cost / target) ** w`` with ``w = -0.07``: a
decoder twice as costly as the target must be about 5 % better to tie. Our loss reward is *negative*, where the same
multiplication would reward cost, so the factor is applied to the reward's magnitude in the direction that always
penalises cost::

    factor = (cost / target) ** weight          # weight = |w| >= 0
    reward' = reward / factor   if reward >= 0  # an AP reward: MnasNet's formula exactly
    reward' = reward * factor   if reward <  0  # minus a loss: the loss is scaled up by the same factor

so ``reward'`` decreases with cost for either sign, equals ``reward`` at ``cost == target``, and the relative change
is the same ``weight * ln(cost / target)`` to first order whatever the reward's scale.

``cost`` is the record's ``gmacs`` (the decoder alone at the cached input size; every proxy result has it) or
``metrics["latency_ms"]`` when an evaluator measures latency. :func:`apply_cost_reward` keeps the raw reward in
``metrics["raw_reward"]`` (and the factor in ``metrics["cost_factor"]``) so reports can show both; a failed record,
or one without a positive cost, is returned unchanged.

Wiring (for the search's owners): a ``cost_reward: CostRewardConfig`` section in ``SearchConfig`` and
``outcome = apply_cost_reward(outcome, cfg.cost_reward)`` where the loop receives each evaluation, before it is
stored and handed to the strategy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

__all__ = ["CostRewardConfig", "apply_cost_reward", "cost_aware_reward"]


@dataclass(frozen=True)
class CostRewardConfig:
    """``enabled``: apply the cost term. ``metric``: ``gmacs`` or ``latency_ms``. ``target``: the cost at which the
    reward is unchanged (e.g. ``fpn-fcos``'s decoder GMACs at the proxy width). ``weight``: MnasNet's ``|w|``."""

    enabled: bool = False
    metric: Literal["gmacs", "latency_ms"] = "gmacs"
    target: Optional[float] = None
    weight: float = 0.07

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight: got {self.weight!r}; expected a finite number >= 0")
        if self.target is not None and not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target: got {self.target!r}; expected a positive number or null")
        if self.enabled and self.target is None:
            raise ValueError("target: got None; expected a positive cost when enabled is true")


def cost_aware_reward(reward: float, cost: float, target: float, weight: float) -> float:
    """``reward`` penalised by ``(cost / target) ** weight`` in the direction of worse (module docstring)."""
    if not (cost > 0 and target > 0):
        raise ValueError(f"cost and target must be positive (got {cost!r}, {target!r})")
    factor = (cost / target) ** weight
    return reward / factor if reward >= 0 else reward * factor


def apply_cost_reward(result: Any, cfg: CostRewardConfig) -> Any:
    """The evaluation record with its reward made cost-aware (raw reward in ``metrics``); unchanged when the term
    is off, the record failed, or its cost is unknown or not positive."""
    if not cfg.enabled or result.status == "failed" or result.reward is None:
        return result
    cost = result.gmacs if cfg.metric == "gmacs" else (result.metrics or {}).get("latency_ms")
    if cost is None or not math.isfinite(float(cost)) or float(cost) <= 0:
        return result
    assert cfg.target is not None  # guaranteed by the config when enabled
    reward = cost_aware_reward(float(result.reward), float(cost), cfg.target, cfg.weight)
    metrics = {**(result.metrics or {}), "raw_reward": float(result.reward),
               "cost_factor": (float(cost) / cfg.target) ** cfg.weight}
    return dataclasses.replace(result, reward=reward, metrics=metrics)
