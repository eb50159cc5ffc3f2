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
``metrics["latency_ms"]`` (measured by the proxy with ``proxy.latency_runs`` > 0, or an evaluator's own).
:func:`apply_cost_reward` keeps the raw reward in ``metrics["raw_reward"]`` (and the factor in
``metrics["cost_factor"]``) so reports can show both; a failed record, or one without a positive cost, is
returned unchanged. The search loop applies it to each evaluation as it arrives, before the result is stored
and handed to the strategy (:func:`resolve_cost_reward` fixes the target once per run).

Choosing ``weight``: the relative change is ``weight x ln(cost / target)``, while the proxy's loss rewards of
different decoders differ by a few per cent at most, so MnasNet's 0.07 makes cost dominate a loss reward; values
around 0.01 trade a few per cent of cost against the loss differences seen in a search.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nasfcos.errors import UserError
from nasfcos.search.config import CostRewardConfig, SearchRunConfig

__all__ = ["TARGET_META_KEY", "CostRewardConfig", "apply_cost_reward", "check_cost_reward", "cost_aware_reward",
           "resolve_cost_reward"]

#: Results-store meta key of the target cost a run fixed when it started (a resumed run reuses it).
TARGET_META_KEY = "cost_reward_target"


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
    if cfg.target is None:
        raise ValueError("apply_cost_reward: the target cost is not resolved (resolve_cost_reward)")
    reward = cost_aware_reward(float(result.reward), float(cost), cfg.target, cfg.weight)
    metrics = {**(result.metrics or {}), "raw_reward": float(result.reward),
               "cost_factor": (float(cost) / cfg.target) ** cfg.weight}
    return dataclasses.replace(result, reward=reward, metrics=metrics)


def check_cost_reward(cfg: SearchRunConfig, using_proxy: bool) -> None:
    """The run's cost-reward settings can be used (checked before the run folder is created): a
    :class:`UserError` naming the key otherwise."""
    cost = cfg.search.cost_reward
    if not cost.enabled:
        return
    if using_proxy and cost.metric == "latency_ms" and cfg.proxy.latency_runs < 1:
        raise UserError("search.cost_reward.metric=latency_ms: the proxy measures no latency; set "
                        "proxy.latency_runs (e.g. --set proxy.latency_runs=20)")
    if cost.target is None:
        if not using_proxy or cfg.cache is None:
            raise UserError("search.cost_reward.target: null measures target_arch on the proxy's feature cache; "
                            "with an evaluator of your own give the target cost as a number")
        from nasfcos.space import resolve_arch

        try:
            resolve_arch(cost.target_arch)
        except UserError as exc:
            raise UserError(f"search.cost_reward.target_arch={cost.target_arch}: {exc}") from None


def resolve_cost_reward(cfg: SearchRunConfig, store: Any, using_proxy: bool) -> CostRewardConfig:
    """The run's cost-reward settings with a numeric target: the configured one, the one a resumed run fixed
    (``store`` meta :data:`TARGET_META_KEY`), or ``target_arch``'s cost measured now on the run's cache with the
    proxy's width, device and threads, then kept in the store. Call :func:`check_cost_reward` first (the loop
    does, before the run folder exists)."""
    cost = cfg.search.cost_reward
    if not cost.enabled or cost.target is not None:
        return cost
    saved = store.get_meta(TARGET_META_KEY)
    if saved is not None:
        return dataclasses.replace(cost, target=float(saved))
    from nasfcos.search.proxy import decoder_cost, decoder_latency_ms
    from nasfcos.space import resolve_arch

    genotype = resolve_arch(cost.target_arch)
    proxy = cfg.proxy
    if cost.metric == "gmacs":
        target = decoder_cost(genotype, str(cfg.cache), proxy.width, fcos=proxy.fcos, concat=proxy.concat)[1]
    else:
        target = decoder_latency_ms(genotype, str(cfg.cache), proxy.width, runs=proxy.latency_runs, fcos=proxy.fcos,
                                    concat=proxy.concat, device=proxy.device, threads=proxy.threads)
    if not (math.isfinite(target) and target > 0):
        raise UserError(f"search.cost_reward.target_arch={cost.target_arch}: measured cost {target!r} is not positive")
    store.set_meta(TARGET_META_KEY, float(target))
    return dataclasses.replace(cost, target=float(target))
