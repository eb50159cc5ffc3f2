"""Rewards with a known optimum, for testing that a search finds what it should.

Each function takes a :class:`~nasfcos.space.genotype.Genotype` and returns a float, so the same functions
serve the strategy-level tests (``tests/test_search_known_answer.py``), the settings measurement
(``benchmarks/ppo_settings.py``) and the CLI tests (``tests/test_search_known_answer_cli.py``: ``nasfcos search --evaluator
known_rewards:dcn_concat_share --python-path tests``).

Why these: they are cheap (microseconds), their optimum is known by construction, and uniform random search
is provably far from it, so "PPO reaches >= 0.95 of the optimum and random does not" is a meaningful test of
the controller and the PPO update, not of luck.

- :func:`dcn_concat_share`: half the share of the FPN's unary ops that are ``dcn3x3`` plus half the share of
  its aggregations that are ``concat``. Optimum 1.0 (every op deformable, every aggregation concat). A uniform
  sampler averages 0.5 * 1/5 + 0.5 * 1/2 = 0.35; 0.95 needs all 7 aggregations concat and at least 13 of the
  14 ops dcn3x3, which uniform sampling hits with probability about 1/128 * 1e-8 per draw.
- :func:`dcn_concat_share_small`: the same reward times 0.02 (optimum 0.02; 0.95 of it = 0.019), the size of
  the differences a real proxy loss shows between candidates: a PPO setting that only works for rewards of
  order one fails here.
- :func:`head_target_share`: half the share of the sequential head's six ops that match a fixed, ordered
  target ``(dcn3x3, sep3x3, sep3x3_d3, conv3x3, conv1x1, skip)`` plus half for ``share_from`` equal to 3: a
  different part of the space (the head) and an order-dependent target. Optimum 1.0; uniform sampling averages
  0.5 * 1/6 + 0.5 * 1/7 ~ 0.155.
"""

from __future__ import annotations

from typing import Any

#: Optimum of each reward (what ">= 0.95 of the optimum" refers to).
OPTIMA: dict[str, float] = {"dcn_concat_share": 1.0, "dcn_concat_share_small": 0.02, "head_target_share": 1.0}

#: The head that :func:`head_target_share` rewards (layer i should be HEAD_TARGET[i]), and its share index.
HEAD_TARGET: tuple[str, ...] = ("dcn3x3", "sep3x3", "sep3x3_d3", "conv3x3", "conv1x1", "skip")
HEAD_TARGET_SHARE = 3


def _fpn_cells(genotype: Any) -> tuple[Any, ...]:
    fpn = genotype.fpn
    if not isinstance(fpn, tuple):
        raise ValueError(f"dcn_concat_share needs a searched FPN (got {type(fpn).__name__})")
    return fpn


def dcn_concat_share(genotype: Any) -> float:
    """0.5 * share of FPN unary ops that are dcn3x3 + 0.5 * share of FPN aggregations that are concat."""
    cells = _fpn_cells(genotype)
    ops = [op for cell in cells for op in (cell.op1, cell.op2)]
    dcn = sum(op == "dcn3x3" for op in ops) / len(ops)
    concat = sum(cell.agg == "concat" for cell in cells) / len(cells)
    return 0.5 * dcn + 0.5 * concat


def dcn_concat_share_small(genotype: Any) -> float:
    """:func:`dcn_concat_share` scaled to the size of proxy-loss differences (optimum 0.02)."""
    return 0.02 * dcn_concat_share(genotype)


def head_target_share(genotype: Any) -> float:
    """0.5 * share of head layers equal to :data:`HEAD_TARGET` + 0.5 * [every level shares from layer 3]."""
    head = genotype.head
    ops = tuple(getattr(head, "ops", ()))
    if len(ops) != len(HEAD_TARGET):
        raise ValueError(f"head_target_share needs a {len(HEAD_TARGET)}-layer sequential head (got {head!r})")
    matches = sum(a == b for a, b in zip(ops, HEAD_TARGET)) / len(HEAD_TARGET)
    shares = tuple(head.share_from)
    share_ok = sum(s == HEAD_TARGET_SHARE for s in shares) / len(shares)
    return 0.5 * matches + 0.5 * share_ok
