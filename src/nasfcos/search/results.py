"""The record of one candidate's evaluation: what every evaluator returns, what travels back from a worker and
what the results store keeps (torch-free).

There is exactly one such record, :class:`EvaluationResult`. The proxy task
(:func:`nasfcos.search.proxy.evaluate_candidate`) returns it; a pluggable evaluator may return it, a dict or
any object with the same attribute names, and :func:`as_result` turns that into the record (a worker never
ships anything else back). The store's row type (:class:`nasfcos.search.store.CandidateRecord`) is this
record plus the candidate's identity (key, genotype, actions, controller step), and the store derives its
columns and SQL schema from these fields, so a metric added here is stored, logged and listed in ``topk.json``
without touching any other file.

``status``: ``"ok"``, ``"failed"`` (``error`` says why; ``reward`` may be ``None``: the search loop applies its
penalty before storing) or ``"pruned"`` (stopped by the early-stop rule; ``reward`` from the weights at that
point). The losses are the meta-val losses the reward was computed from; ``gmacs``/``params`` are the decoder's
at the cached input size (batch 1). ``early_stop_loss`` is the meta-val loss after the early-stop epoch, which
the loop folds into its :class:`~nasfcos.search.early_stop.EarlyStopReference` once the batch is complete.
``history`` has one entry per epoch run, ``{"epoch", "train_loss", "val_loss"}``. Timing and history are not
part of equality (two runs of the same candidate give equal records). ``metrics`` holds a pluggable evaluator's
own numbers (``{"latency_ms": 3.1}``: every numeric key of its answer that is not a field here), stored with
the record as JSON and logged as ``candidate/metrics/<name>``; a non-finite value is kept as ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LOGGED", "STATUSES", "EvaluationResult", "as_result"]

#: The possible outcomes of an evaluation (the store's ``status`` column accepts exactly these).
STATUSES = ("ok", "failed", "pruned")

#: Field metadata marking the numbers logged per candidate (``candidate/<name>`` scalars).
LOGGED = {"logged": True}


def _metric(**kwargs: Any) -> Any:
    return field(default=None, metadata=LOGGED, **kwargs)


@dataclass(frozen=True, kw_only=True)
class EvaluationResult:
    """One evaluation of one candidate (see the module docstring)."""

    status: str = "ok"
    reward: float | None
    loss_cls: float | None = _metric()
    loss_reg: float | None = _metric()
    loss_ctr: float | None = _metric()
    ap: float | None = _metric()
    gmacs: float | None = _metric()
    params: int | None = _metric()
    wall_time_s: float | None = _metric(compare=False)  # timing is not part of the result
    epochs_run: int | None = None
    early_stop_loss: float | None = None
    error: str | None = None
    seed: int | None = None
    history: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    metrics: dict[str, float | None] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status: got {self.status!r}; expected one of {STATUSES}")
        if not isinstance(self.history, tuple):
            object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(self, "metrics", {str(name): _finite_or_none(value)
                                             for name, value in dict(self.metrics or {}).items()})

    @classmethod
    def failure(cls, error: str, wall_time_s: float | None = None, **fields: Any) -> EvaluationResult:
        """A failed evaluation (no reward: the search loop decides the penalty)."""
        return cls(status="failed", reward=None, error=error, wall_time_s=wall_time_s, **fields)

    @property
    def loss_sum(self) -> float | None:
        """``loss_cls + loss_reg + loss_ctr`` on meta-val, or ``None``."""
        parts = (self.loss_cls, self.loss_reg, self.loss_ctr)
        return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]

    @property
    def evaluation(self) -> EvaluationResult:
        """The evaluation alone (a store row without its identity fields)."""
        return EvaluationResult(**self.evaluation_fields())

    def evaluation_fields(self) -> dict[str, Any]:
        """The :class:`EvaluationResult` fields of this record (also of a subclass: a store row), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EvaluationResult)}

    def scalars(self) -> dict[str, float]:
        """The logged numbers that are known (``None`` left out); an evaluator's own metrics as
        ``metrics/<name>``."""
        out = {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.metadata.get("logged") and getattr(self, f.name) is not None}
        out.update((f"metrics/{name}", value) for name, value in self.metrics.items() if value is not None)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict (``history`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["history"] = [dict(entry) for entry in self.history]
        data["metrics"] = dict(self.metrics)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """The record from :meth:`to_dict` output (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------------------
# Normalising what an evaluator returned
# --------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        if hasattr(value, "item"):  # 0-d tensor or NumPy scalar
            value = value.item()
        return float(value)
    except Exception:  # noqa: BLE001 - anything that is not one number (a string, a multi-element array)
        return None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None or not math.isfinite(number) else int(number)


def _finite_or_none(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _is_scalar(value: Any) -> bool:
    """A single real number (Python, NumPy, a one-element tensor); ``bool`` is not one (likely a bug)."""
    if isinstance(value, (bool, str, bytes, Mapping)):
        return False
    if isinstance(value, numbers.Real):
        return True
    if not hasattr(value, "item"):
        return False
    try:
        item = value.item()
    except Exception:  # noqa: BLE001 - more than one element
        return False
    return isinstance(item, numbers.Real) and not isinstance(item, bool)


#: How each field of an evaluator's answer is read (anything else: kept as given).
_READERS = {
    "reward": _number, "loss_cls": _number, "loss_reg": _number, "loss_ctr": _number, "ap": _number,
    "gmacs": _number, "wall_time_s": _number, "early_stop_loss": _number,
    "params": _integer, "epochs_run": _integer, "seed": _integer,
    "error": lambda v: None if v is None else str(v),
    "history": lambda v: tuple(v or ()),
    "metrics": lambda v: {str(k): _finite_or_none(x) for k, x in v.items() if _is_scalar(x) or x is None}
    if isinstance(v, Mapping) else {},
}

#: What an evaluator may return, for the failure message.
EXPECTED_ANSWER = "a float reward, a mapping with 'reward' or an EvaluationResult"


def as_result(value: Any, wall_time_s: float | None = None) -> EvaluationResult:
    """The :class:`EvaluationResult` of an evaluator's return value, numbers made plain floats/ints.

    Accepted: a number (the reward), a mapping (its keys that are field names fill those fields, a ``metrics``
    mapping and every other *numeric* key go to ``metrics``; other keys are ignored), the record itself or any
    object with its attribute names. What cannot be a successful result becomes ``status="failed"`` with the
    reason: an unknown status, a missing or non-finite reward of an ``ok``/``pruned`` result, an unusable
    return type (a string, ``None``, ``bool``, a list). ``wall_time_s`` fills in a missing timing."""
    if _is_scalar(value):
        value = {"reward": value}
    extra: dict[str, Any] = {}
    if isinstance(value, Mapping):
        get = value.get
        known = {f.name for f in dataclasses.fields(EvaluationResult)}
        extra = {str(k): v for k, v in value.items() if k not in known and (_is_scalar(v) or v is None)}
    elif isinstance(value, EvaluationResult) or hasattr(value, "status"):
        def get(name: str, default: Any = None) -> Any:
            return getattr(value, name, default)
    else:
        return EvaluationResult.failure(
            f"evaluator returned {type(value).__name__}; expected {EXPECTED_ANSWER}", wall_time_s)
    status = str(get("status", "ok"))
    if status not in STATUSES:
        return EvaluationResult.failure(f"evaluator returned status {status!r}; expected one of {STATUSES}",
                                        wall_time_s)
    names = [f.name for f in dataclasses.fields(EvaluationResult) if f.name != "status"]
    fields = {name: _READERS.get(name, lambda v: v)(get(name)) for name in names}
    fields["metrics"] = {**_READERS["metrics"](extra), **fields["metrics"]}
    if fields["wall_time_s"] is None:
        fields["wall_time_s"] = wall_time_s
    reward = fields["reward"]
    if status != "failed" and (reward is None or not math.isfinite(reward)):
        status, fields["reward"] = "failed", None
        if fields["error"] is None:
            raw = get("reward")
            fields["error"] = (f"evaluator returned no reward (keys: {', '.join(map(str, value))}); expected "
                               f"{EXPECTED_ANSWER}" if isinstance(value, Mapping) and raw is None
                               else f"evaluator returned a non-finite or non-numeric reward ({raw!r})")
    return EvaluationResult(status=status, **fields)
