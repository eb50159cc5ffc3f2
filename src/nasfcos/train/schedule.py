"""Iteration-based learning-rate schedule: linear warmup, then step decay (FACTS 4).

The FCOS recipe ramps the learning rate linearly from ``base_lr / 3`` to ``base_lr`` over the first 500
iterations (large early gradients of a freshly initialised head otherwise blow up the loss), then multiplies
it by 0.1 at iterations 60k and 80k of 90k. The schedule counts optimiser iterations, not epochs: call
``scheduler.step()`` once after every ``optimizer.step()``. After ``n`` calls the learning rate is the one for
iteration ``n`` (iteration 0 is the first optimiser step).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from nasfcos.config import SolverConfig

__all__ = ["WarmupMultiStepLR", "build_scheduler_from_config", "lr_factor"]

WARMUP_METHODS = ("linear", "constant")


def lr_factor(
    iteration: int,
    steps: Sequence[int],
    gamma: float = 0.1,
    warmup_factor: float = 1.0 / 3.0,
    warmup_iters: int = 500,
    warmup_method: str = "linear",
) -> float:
    """Multiplier of the base learning rate at ``iteration``.

    Decay: ``gamma ** (number of steps <= iteration)``. Warmup (``iteration < warmup_iters``): ``linear`` goes
    from ``warmup_factor`` at 0 towards 1 (``warmup_factor * (1 - a) + a`` with ``a = iteration /
    warmup_iters``); ``constant`` stays at ``warmup_factor``.
    """
    if warmup_method not in WARMUP_METHODS:
        raise ValueError(f"warmup_method must be one of {WARMUP_METHODS}, got {warmup_method!r}")
    warmup = 1.0
    if iteration < warmup_iters:
        if warmup_method == "constant":
            warmup = warmup_factor
        else:
            alpha = iteration / warmup_iters
            warmup = warmup_factor * (1.0 - alpha) + alpha
    return warmup * gamma ** bisect.bisect_right(list(steps), iteration)


class WarmupMultiStepLR(LRScheduler):
    """Warmup followed by multi-step decay, as a ``torch.optim.lr_scheduler.LRScheduler``.

    Every parameter group keeps its own base learning rate (the bias group's is twice the default), and the
    same factor :func:`lr_factor` scales them all. ``state_dict()`` holds only plain numbers and lists, so it
    round-trips through a ``weights_only`` checkpoint.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 1.0 / 3.0,
        warmup_iters: int = 500,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        steps = [int(s) for s in steps]
        if steps != sorted(steps):
            raise ValueError(f"steps must be increasing, got {steps}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"warmup_method must be one of {WARMUP_METHODS}, got {warmup_method!r}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.steps = steps
        self.gamma = float(gamma)
        self.warmup_factor = float(warmup_factor)
        self.warmup_iters = int(warmup_iters)
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int | None = None) -> float:
        """The learning-rate multiplier at ``iteration`` (default: the current one)."""
        it = self.last_epoch if iteration is None else iteration
        return lr_factor(it, self.steps, self.gamma, self.warmup_factor, self.warmup_iters, self.warmup_method)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Closed form: no dependence on the previous learning rate, so resuming is exact."""
        f = self.factor()
        return [base_lr * f for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def build_scheduler_from_config(optimizer: torch.optim.Optimizer, solver: SolverConfig) -> WarmupMultiStepLR:
    """:class:`WarmupMultiStepLR` with the values of a ``SolverConfig``."""
    return WarmupMultiStepLR(
        optimizer,
        steps=solver.steps,
        gamma=solver.gamma,
        warmup_factor=solver.warmup_factor,
        warmup_iters=solver.warmup_iters,
        warmup_method=solver.warmup_method,
    )
