"""The running reference behind early stopping of hopeless candidates (nas-segm's rule, FACTS 5); torch-free.

The proxy validates a candidate once after ``early_stop_epoch`` epochs and prunes it when that loss is far
above what candidates usually reach at that epoch. "Usually" is this reference: a running mean and standard
deviation of that epoch's meta-val loss over every candidate that reached it. The proxy only *reads* it (it
may run in another process); the search loop owns it, folds each batch's ``early_stop_loss`` values in (in
proposal order) and commits it with the strategy state, so a resumed search prunes exactly as before. See
:mod:`nasfcos.search.proxy` for why standard deviations rather than a ratio of the mean.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nasfcos.search.config import ProxyConfig
from nasfcos.search.results import EvaluationResult

__all__ = ["EarlyStopReference"]


@dataclass
class EarlyStopReference:
    """Running statistics of candidates' meta-val loss after ``epoch`` epochs; the loop keeps and updates it.

    ``mean``/``var`` are running over every candidate that reached ``epoch`` (pruned ones included, failed ones
    not): the plain average while ``count < 1 / (1 - decay)``, then exponential with ``decay``. ``best`` is the
    lowest such loss, ``count`` how many were seen.
    """

    epoch: int = 2
    decay: float = 0.9
    count: int = 0
    mean: float | None = None
    var: float = 0.0
    best: float | None = None

    #: The standard deviation used is at least this fraction of the mean (identical losses must not make
    #: every slightly worse candidate "hopeless").
    MIN_RELATIVE_STD = 0.01

    @classmethod
    def for_config(cls, cfg: ProxyConfig) -> EarlyStopReference:
        return cls(epoch=cfg.early_stop_epoch, decay=cfg.early_stop_decay)

    def update(self, value: EvaluationResult | float | None) -> bool:
        """Fold a candidate's early-epoch val loss in (a failed result counts as nothing); returns whether
        anything was recorded."""
        if isinstance(value, EvaluationResult):
            value = None if value.status == "failed" else value.early_stop_loss
        if value is None or not math.isfinite(float(value)):
            return False
        value = float(value)
        self.count += 1
        if self.mean is None:
            self.mean, self.var = value, 0.0
        else:
            alpha = max(1.0 - self.decay, 1.0 / self.count)
            diff = value - self.mean
            self.mean += alpha * diff
            self.var = (1.0 - alpha) * (self.var + alpha * diff * diff)
        self.best = value if self.best is None else min(self.best, value)
        return True

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def threshold(self, margin: float, min_samples: int = 0) -> float | None:
        """The loss above which a candidate is pruned, or ``None`` while the reference is not ready."""
        if self.mean is None or self.count < max(1, min_samples):
            return None
        return self.mean + float(margin) * max(self.std, self.MIN_RELATIVE_STD * abs(self.mean))

    def should_stop(self, loss: float, margin: float, min_samples: int = 0) -> bool:
        limit = self.threshold(margin, min_samples)
        return limit is not None and (not math.isfinite(loss) or loss > limit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EarlyStopReference:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
