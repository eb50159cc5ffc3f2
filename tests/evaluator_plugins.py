"""User-style evaluators for ``nasfcos search --evaluator evaluator_plugins:<name> --python-path tests``.

They are written the way a user writes an objective: one argument (a Genotype), a float or a mapping back, no
nasfcos imports. The rewards come from :mod:`known_rewards` (optimum known); the others add what a real
objective does: extra metrics, sleeping (so a test can SIGKILL a search mid-run), and failing in every way an
evaluator can (an exception, NaN, a wrong return type, a mapping without a reward).
"""

from __future__ import annotations

import os
import time
from typing import Any

import known_rewards

#: Seconds each evaluation of :func:`slow_dcn_concat_share` sleeps (read in whichever process evaluates).
SLEEP_ENV = "NASFCOS_TEST_EVAL_SLEEP"
#: File that :func:`slow_dcn_concat_share` appends each evaluated key to (one line per evaluation).
CALLS_FILE_ENV = "NASFCOS_TEST_CALLS_FILE"

#: Not callable: ``--evaluator evaluator_plugins:NOT_A_FUNCTION`` is a user mistake.
NOT_A_FUNCTION = 42


def slow_dcn_concat_share(genotype: Any) -> float:
    """:func:`known_rewards.dcn_concat_share` after ``$NASFCOS_TEST_EVAL_SLEEP`` seconds; logs the key."""
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(genotype.key() + "\n")
    return known_rewards.dcn_concat_share(genotype)


def shares(genotype: Any) -> dict[str, float]:
    """The two halves of the reward as separate metrics: ``dcn`` and ``concat`` shares of the FPN."""
    cells = genotype.fpn
    ops = [op for cell in cells for op in (cell.op1, cell.op2)]
    return {"dcn_share": sum(op == "dcn3x3" for op in ops) / len(ops),
            "concat_share": sum(cell.agg == "concat" for cell in cells) / len(cells)}


def with_metrics(genotype: Any) -> dict[str, Any]:
    """A mapping: the reward, two numeric metrics, a known field (``params``) and a text note (ignored)."""
    return {"reward": known_rewards.dcn_concat_share(genotype), **shares(genotype), "params": 1234,
            "note": "text is not a metric"}


#: What :func:`troublesome` does with a genotype, by ``failure_kind``.
FAILURES = ("raises", "nan", "string", "no_reward", "bool")


def failure_kind(key: str) -> str | None:
    """``None`` (a good answer) for about half of the keys, else one of :data:`FAILURES`."""
    slot = int(key[:8], 16) % 10
    return FAILURES[slot] if slot < len(FAILURES) else None


def troublesome(genotype: Any) -> Any:
    """Fails in one of five ways for about half of the genotypes (see :func:`failure_kind`)."""
    kind = failure_kind(genotype.key())
    if kind == "raises":
        raise ValueError(f"objective broke on {genotype.key()[:8]}")
    if kind == "nan":
        return float("nan")
    if kind == "string":
        return "0.5"
    if kind == "no_reward":
        return {"score": 0.5}
    if kind == "bool":
        return True
    return with_metrics(genotype)
