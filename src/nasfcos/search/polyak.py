"""Polyak (exponential moving) averaging of a model's weights for the proxy task.

NAS-FCOS trains each candidate decoder for only a few epochs on cached features and validates the *averaged*
weights (decay 0.9, FACTS 5), which are much less noisy than the last iterate: after every optimiser step
``avg = decay * avg + (1 - decay) * p``. The average starts as a copy of the model when the averager is created
(so create it after moving the model to its device and after initialisation).

Buffers: floating-point buffers (BatchNorm running mean/var) are **copied** from the live model at every
update by default (``buffers="copy"``). They are already exponential averages with momentum 0.1, computed with
weights that differ from the averaged ones only by a few steps at decay 0.9; averaging them again would add a
second lag. ``buffers="average"`` applies the same formula to them instead. Integer buffers (BatchNorm's
``num_batches_tracked``) are always copied.

Use :meth:`PolyakAverager.swap_in` to validate the live module with the averaged weights (no second module
on the device is needed, and it restores the trained weights afterwards), or :meth:`averaged_model` for a
standalone averaged copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class PolyakAverager:
    """Keeps ``avg = decay * avg + (1 - decay) * p`` for every parameter (and buffer) of ``model``."""

    def __init__(self, model: nn.Module, decay: float = 0.9, buffers: str = "copy") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Polyak decay must be in [0, 1) (got {decay})")
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average' (got {buffers!r})")
        self.model = model
        self.decay = float(decay)
        self.buffers = buffers
        self.num_updates = 0
        self._params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self._buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average; call after every optimiser step."""
        d = self.decay
        for name, p in self.model.named_parameters():
            avg = self._params[name]
            avg.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for name, b in self.model.named_buffers():
            avg = self._buffers[name]
            if self.buffers == "average" and b.is_floating_point():
                avg.mul_(d).add_(b.detach(), alpha=1.0 - d)
            else:
                avg.copy_(b.detach())
        self.num_updates += 1

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and buffers, keyed like ``model.state_dict()`` (views, do not modify)."""
        return {**self._params, **self._buffers}

    def averaged_model(self) -> nn.Module:
        """A new copy of the model holding the averaged weights (the live model is not touched)."""
        clone = copy.deepcopy(self.model)
        self._load_into(clone)
        return clone

    @contextmanager
    def swap_in(self) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into the live model; restores the trained weights on exit."""
        backup_params = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        backup_buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        self._load_into(self.model)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(backup_params[name])
                for name, b in self.model.named_buffers():
                    b.copy_(backup_buffers[name])

    @torch.no_grad()
    def _load_into(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self._params[name])
        for name, b in module.named_buffers():
            b.copy_(self._buffers[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "buffers": self.buffers,
            "num_updates": self.num_updates,
            "params": {name: t.clone() for name, t in self._params.items()},
            "buffer_values": {name: t.clone() for name, t in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["params"]) != set(self._params) or set(state["buffer_values"]) != set(self._buffers):
            raise ValueError("Polyak state does not match the model's parameters and buffers")
        self.decay = float(state["decay"])
        self.buffers = str(state["buffers"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for name, t in state["params"].items():
                self._params[name].copy_(t)
            for name, t in state["buffer_values"].items():
                self._buffers[name].copy_(t)
