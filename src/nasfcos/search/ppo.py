"""Proximal policy optimisation for the architecture controller (NAS-FCOS Sec. 3.3, nas-segm's recipe).

Settings from FACTS 5: Adam lr 1e-4, clip 0.1, gradient-norm clip 2.0, a moving-average reward baseline with
decay 0.95, no entropy bonus, and an update after every evaluated architecture over a buffer of the last 100
samples. :meth:`PPOTrainer.update` takes a *batch* of evaluated samples so that a parallel executor can
evaluate several candidates between updates; with batches of one it is exactly the sequential recipe.

How one update works:

1. **Baseline.** The advantages of the new samples are ``reward - baseline`` with the baseline as it was
   *before* this batch, so a sample's advantage does not depend on its own reward. The very first batch has
   no history: the baseline is initialised to the mean reward of that batch (a zero-mean first batch, instead
   of a huge first advantage when rewards are, e.g., minus a loss around -3). Afterwards the baseline absorbs
   each new reward in order: ``b = decay * b + (1 - decay) * r``.
2. **Buffer.** ``(actions, log_prob_old, advantage)`` of the new samples join a FIFO of the last
   ``buffer_size`` samples. Advantages and old log-probabilities are frozen at the time a sample joins; old
   samples whose policy ratio has drifted outside ``[1 - clip, 1 + clip]`` stop contributing gradient, which
   is what makes the reuse safe.
3. **Epochs.** ``epochs`` full-batch gradient steps on the clipped surrogate
   ``-mean(min(r * A, clip(r, 1 - eps, 1 + eps) * A)) - entropy_weight * mean(H)``, with
   ``r = exp(log_prob - log_prob_old)``, and gradient-norm clipping before every Adam step.
   ``normalize_advantages=True`` standardises the buffer's advantages (per update) first.

:meth:`PPOTrainer.state_dict` holds the controller, the optimiser, the baseline, the buffer and the step
count as plain Python values and tensors (``torch.load(..., weights_only=True)`` reads it back), so a search
resumes exactly where it stopped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nasfcos.errors import UserError
from nasfcos.search.controller import Controller, MaskFn


@dataclass(frozen=True)
class Sample:
    """One evaluated architecture: its actions, their log-probability when sampled, and its reward."""

    actions: tuple[int, ...]
    log_prob_old: float
    reward: float


@dataclass(frozen=True)
class _BufferEntry:
    actions: tuple[int, ...]
    log_prob_old: float
    advantage: float
    reward: float


def clipped_surrogate(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate loss (to minimise) and two diagnostics.

    Returns ``(loss, clip_fraction, approx_kl)``: ``loss = -mean(min(r*A, clamp(r, 1-clip, 1+clip)*A))``,
    ``clip_fraction`` = share of samples with ``|r - 1| > clip``, ``approx_kl = mean(old - new)``
    (an estimate of KL(old || new) from samples drawn from the old policy).
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip).float().mean()
        approx_kl = (old_log_probs - log_probs).mean()
    return loss, clip_fraction, approx_kl


def _check_setting(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"ppo.{name}: invalid value (got {value!r}); expected {expected}")


class PPOTrainer:
    """Updates a :class:`Controller` with PPO from batches of evaluated samples.

    Args:
        controller: the policy to train (its ``default_mask_fn`` is used unless ``mask_fn`` is given).
        lr: Adam learning rate.
        clip: PPO clip range epsilon.
        grad_clip: maximum gradient norm (``None`` or ``0`` disables clipping).
        baseline_decay: decay of the moving-average reward baseline.
        entropy_weight: weight of the entropy bonus (nas-segm: 0).
        epochs: gradient steps per update over the buffer.
        buffer_size: how many of the latest samples each update trains on.
        normalize_advantages: standardise the buffer's advantages before each update.
        mask_fn: the action mask (``SearchSpace.valid_choices``); must match the one used to sample.
    """

    def __init__(
        self,
        controller: Controller,
        lr: float = 1e-4,
        clip: float = 0.1,
        grad_clip: float | None = 2.0,
        baseline_decay: float = 0.95,
        entropy_weight: float = 0.0,
        epochs: int = 4,
        buffer_size: int = 100,
        normalize_advantages: bool = False,
        mask_fn: MaskFn | None = None,
    ) -> None:
        _check_setting("lr", lr, lr > 0, "> 0")
        _check_setting("clip", clip, 0 < clip < 1, "in (0, 1)")
        _check_setting("grad_clip", grad_clip, grad_clip is None or grad_clip >= 0, ">= 0 or null")
        _check_setting("baseline_decay", baseline_decay, 0 <= baseline_decay < 1, "in [0, 1)")
        _check_setting("entropy_weight", entropy_weight, entropy_weight >= 0, ">= 0")
        _check_setting("epochs", epochs, int(epochs) == epochs and epochs >= 1, "an integer >= 1")
        _check_setting("buffer_size", buffer_size, int(buffer_size) == buffer_size and buffer_size >= 1,
                       "an integer >= 1")
        self.controller = controller
        self.lr = float(lr)
        self.clip = float(clip)
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.baseline_decay = float(baseline_decay)
        self.entropy_weight = float(entropy_weight)
        self.epochs = int(epochs)
        self.buffer_size = int(buffer_size)
        self.normalize_advantages = bool(normalize_advantages)
        self.mask_fn = mask_fn
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=self.lr)
        self.baseline: float | None = None
        self.step = 0
        self._buffer: deque[_BufferEntry] = deque(maxlen=self.buffer_size)

    @property
    def buffer(self) -> tuple[_BufferEntry, ...]:
        """The samples the next update trains on, oldest first."""
        return tuple(self._buffer)

    def _advance_baseline(self, rewards: Sequence[float]) -> float:
        """Return the baseline the batch is judged against, then absorb the batch's rewards."""
        if self.baseline is None:
            self.baseline = sum(rewards) / len(rewards)
        before = self.baseline
        for reward in rewards:
            self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * reward
        return before

    def update(self, batch: Sequence[Sample]) -> dict[str, float]:
        """Add ``batch`` to the buffer and run ``epochs`` PPO steps over the buffer; returns statistics.

        Statistics: ``policy_loss`` and ``grad_norm`` (pre-clipping) of the last epoch; ``approx_kl``,
        ``clip_fraction`` and ``entropy`` (mean per sample) of the updated policy on the buffer;
        ``baseline`` (after absorbing the batch); ``advantage_mean`` and ``reward_mean`` of the batch;
        ``buffer_size``; ``step`` (updates done so far, this one included).
        """
        if len(batch) == 0:
            raise ValueError("PPO update needs at least one sample")
        num_decisions = self.controller.num_decisions
        rewards = []
        for sample in batch:
            if not math.isfinite(sample.reward) or not math.isfinite(sample.log_prob_old):
                raise ValueError(f"non-finite reward or log-probability in PPO sample {sample}")
            if len(sample.actions) != num_decisions:
                raise ValueError(f"sample has {len(sample.actions)} actions; the controller expects {num_decisions}")
            rewards.append(float(sample.reward))
        # Reject actions the mask forbids before any state changes (a bad batch leaves the trainer as it was).
        self.controller.compute_masks([tuple(sample.actions) for sample in batch], self.mask_fn)
        baseline_before = self._advance_baseline(rewards)
        advantages = [reward - baseline_before for reward in rewards]
        for sample, advantage in zip(batch, advantages):
            self._buffer.append(
                _BufferEntry(tuple(int(a) for a in sample.actions), float(sample.log_prob_old), advantage,
                             float(sample.reward))
            )

        device = self.controller.start.device
        entries = list(self._buffer)
        actions = torch.tensor([entry.actions for entry in entries], dtype=torch.long, device=device)
        old_log_probs = torch.tensor([entry.log_prob_old for entry in entries], device=device)
        buffer_advantages = torch.tensor([entry.advantage for entry in entries], device=device)
        if self.normalize_advantages and len(entries) > 1:
            std = buffer_advantages.std()
            buffer_advantages = (buffer_advantages - buffer_advantages.mean()) / (std + 1e-8)
        masks = self.controller.compute_masks(actions, self.mask_fn)

        self.controller.train()
        loss_value = 0.0
        grad_norm = 0.0
        for _ in range(self.epochs):
            log_probs, entropies = self.controller.evaluate(actions, masks=masks)
            loss, _, _ = clipped_surrogate(log_probs, old_log_probs, buffer_advantages, self.clip)
            if self.entropy_weight:
                loss = loss - self.entropy_weight * entropies.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parameters = [p for p in self.controller.parameters() if p.grad is not None]
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
            self.optimizer.step()
            loss_value = float(loss.detach())
            grad_norm = float(norm)
        self.step += 1

        with torch.no_grad():
            log_probs, entropies = self.controller.evaluate(actions, masks=masks)
            _, clip_fraction, approx_kl = clipped_surrogate(log_probs, old_log_probs, buffer_advantages, self.clip)
        return {
            "policy_loss": loss_value,
            "grad_norm": grad_norm,
            "approx_kl": float(approx_kl),
            "clip_fraction": float(clip_fraction),
            "entropy": float(entropies.mean()),
            "baseline": float(self.baseline),  # type: ignore[arg-type]
            "advantage_mean": sum(advantages) / len(advantages),
            "reward_mean": sum(rewards) / len(rewards),
            "buffer_size": float(len(entries)),
            "step": float(self.step),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: controller, optimiser, baseline, buffer, step (weights_only-safe)."""
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "step": self.step,
            "buffer": {
                "actions": [list(entry.actions) for entry in self._buffer],
                "log_prob_old": [entry.log_prob_old for entry in self._buffer],
                "advantage": [entry.advantage for entry in self._buffer],
                "reward": [entry.reward for entry in self._buffer],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the controller must have the same decisions and sizes."""
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        baseline = state["baseline"]
        self.baseline = None if baseline is None else float(baseline)
        self.step = int(state["step"])
        buffer = state["buffer"]
        self._buffer = deque(
            (
                _BufferEntry(tuple(int(a) for a in actions), float(log_prob), float(advantage), float(reward))
                for actions, log_prob, advantage, reward in zip(
                    buffer["actions"], buffer["log_prob_old"], buffer["advantage"], buffer["reward"]
                )
            ),
            maxlen=self.buffer_size,
        )
