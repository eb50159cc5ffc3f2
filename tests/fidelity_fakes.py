"""Cheap, deterministic scorers for the fidelity study's machinery tests (the ``Scorers`` hook of
:mod:`nasfcos.analysis.fidelity`), importable by a ``nasfcos fidelity`` subprocess through
``NASFCOS_FIDELITY_SCORERS=fidelity_fakes:make_scorers`` with ``tests/`` on ``PYTHONPATH``.

The reference AP of a decoder is a fixed function of its name plus ``SEED_STEP * seed``, so the seed spread and
every correlation have a known answer. Proxy settings are recognised by name:

- ``exact``: loss = ``1 - AP(name, seed 0)``, meta-val AP = ``AP / 2`` (both orders equal the reference's:
  tau = rho = 1, full top-k overlap);
- ``reversed``: loss = ``AP(name, seed 0)`` (the reversed order: tau = rho = -1, no top-3 overlap with >= 6
  decoders), no AP;
- anything else: loss from a hash of the name (an unrelated order).

Environment (for subprocess tests): ``FIDELITY_FAKE_CALLS`` = a file each call appends its unit id to;
``FIDELITY_FAKE_KILL_AT`` = n: the n-th call of this process SIGKILLs the process before doing anything (so exactly
n - 1 units are recorded, deterministically, with no sleeping).
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

SEED_STEP = 0.001


def base_ap(name: str) -> float:
    """A fixed AP in [0.05, 0.35) per decoder name, well spread (distinct for distinct names in practice)."""
    value = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 16**8
    return 0.05 + 0.3 * value


def reference_ap(name: str, seed: int) -> float:
    return base_ap(name) + SEED_STEP * seed


class FakeScorers:
    """Counts its calls (``calls``: unit ids in order); ``interrupt_at``: the n-th call raises KeyboardInterrupt."""

    def __init__(self, ctx: Any = None, interrupt_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at
        self.calls_file = os.environ.get("FIDELITY_FAKE_CALLS")
        kill_at = os.environ.get("FIDELITY_FAKE_KILL_AT")
        self.kill_at = int(kill_at) if kill_at else None

    def _enter(self, unit: Any) -> None:
        if self.kill_at is not None and len(self.calls) + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.interrupt_at is not None and len(self.calls) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(unit.id)
        if self.calls_file:
            with open(self.calls_file, "a", encoding="utf-8") as handle:
                handle.write(unit.id + "\n")

    def reference(self, unit: Any, ctx: Any) -> dict[str, float]:
        self._enter(unit)
        ap = reference_ap(unit.decoder.name, unit.seed)
        return {"AP": ap, "AP50": min(1.0, 2 * ap)}

    def proxy(self, unit: Any, ctx: Any) -> dict[str, Any]:
        self._enter(unit)
        name = unit.setting.name
        ap = reference_ap(unit.decoder.name, 0)
        result: dict[str, Any] = {"status": "ok", "loss_reg": 0.25, "loss_ctr": 0.5, "wall_time_s": 0.5}
        if name.startswith("exact"):
            loss = 1.0 - ap
            result["ap"] = ap / 2
        elif name.startswith("reversed"):
            loss = ap
        else:
            loss = int(hashlib.sha1((name + unit.decoder.name).encode()).hexdigest()[:6], 16) / 16**6
        result["loss_cls"] = loss
        result["reward"] = -(loss + 0.75)
        return result


def make_scorers(ctx: Any) -> FakeScorers:
    """The ``NASFCOS_FIDELITY_SCORERS`` factory."""
    return FakeScorers(ctx)
