"""Proximal policy optimisation for the architecture controller (NAS-FCOS Sec. 3.3, nas-segm's recipe).

Defaults from FACTS 5 (the paper / nas-segm recipe): Adam lr 1e-4, clip 0.1, gradient-norm clip 2.0, a
moving-average reward baseline with decay 0.95, no entropy bonus, and an update after every evaluated
architecture over a buffer of the last 100 samples. :meth:`PPOTrainer.update` takes a *batch* of evaluated
samples so that a parallel executor can evaluate several candidates between updates; with batches of one it is
exactly the sequential recipe.

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
3. **Epochs.** ``epochs`` full-batch gradient steps maximising
   ``mean_i(min(r_i A_i, clip(r_i, 1 - eps, 1 + eps) A_i) + entropy_weight * live_i * H_i)`` over the buffer,
   with ``r = exp(log_prob - log_prob_old)``, ``live_i`` = "sample i's surrogate still has a gradient" and
   gradient-norm clipping before every Adam step. ``normalize_advantages=True`` standardises the buffer's
   advantages (per update) first, which makes the step independent of the reward's scale (a proxy loss
   differs between candidates by hundredths; a known-answer reward by tenths).

Why the entropy bonus is masked by ``live``: with a buffer of 100 and batches of 8, only the newest batch is
inside the clip range at the start of an update (82-87 % of the buffer is not), so the surrogate's gradient
comes from ~8 samples while an unmasked bonus averaged over all 100 had about 12 times its nominal weight and
pointed against learning; measured in ``benchmarks/ppo_settings.py``. With ``buffer_size == batch size`` the
update is on-policy (every entry is the latest batch) and the mask only matters from the second epoch.

The paper's recipe (``lr=1e-4, buffer_size=100, entropy_weight=0``) is these defaults; the CPU preset
(``configs/search-cpu.yaml``) uses the settings measured to learn within a few hundred evaluations.

Diagnostics (:meth:`PPOTrainer.update`'s return value; the search loop logs it as ``update/*``): KL between
the pre- and post-update policy on samples drawn from the former (an estimator that cannot be negative), the
clip fraction of the new batch during the epochs, the policy's entropy next to the masked-uniform maximum,
the share of the buffer that still has a gradient, advantage mean/std and the baseline. A controller that
learns shows KL > 0, entropy falling below its maximum and a baseline rising with the batch rewards; a
stalled one shows KL ~ 0 and entropy pinned at the maximum.

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


@dataclass(frozen=True)
class SurrogateTerms:
    """Per-sample pieces of PPO's clipped surrogate (all ``[n]``).

    ``objective`` = ``min(r*A, clamp(r, 1-eps, 1+eps)*A)`` (to maximise; carries the gradient);
    ``live`` = the samples whose objective still has a gradient, i.e. the clip does not bind in the
    direction the advantage pushes (not ``r > 1+eps`` with ``A > 0``, not ``r < 1-eps`` with ``A < 0``);
    ``clipped`` = ``|r - 1| > eps`` (the usual "clip fraction" counts these).
    """

    objective: Tensor
    live: Tensor
    clipped: Tensor


def clipped_surrogate(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip: float) -> SurrogateTerms:
    """PPO's clipped surrogate per sample, with ``r = exp(log_probs - old_log_probs)``."""
    ratio = torch.exp(log_probs - old_log_probs)
    objective = torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages)
    with torch.no_grad():
        dead = ((ratio > 1.0 + clip) & (advantages > 0)) | ((ratio < 1.0 - clip) & (advantages < 0))
        clipped = (ratio - 1.0).abs() > clip
    return SurrogateTerms(objective, ~dead, clipped)


def stepwise_kl(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """KL(before || after) of two autoregressive policies, from their per-step log-probabilities along the
    same prefixes (:meth:`Controller.step_log_probs`), averaged over the prefixes.

    Per sequence: ``sum_t sum_c p_t(c) (log p_t(c) - log q_t(c))``, the exact KL of each step's distributions
    given the prefix. When the prefixes were drawn from ``before``, the mean is an unbiased estimate of the
    KL between the sequence distributions (chain rule), every term is >= 0 (so, unlike the naive
    ``mean(log p - log q)`` on the sampled actions, it cannot come out negative), it has far less variance
    than estimators built from the sampled actions' ratios alone, and it is exactly 0 when the policy did not
    move. Choices masked out (``-inf`` in both) contribute nothing.
    """
    total: Tensor | None = None
    for p_log, q_log in zip(before, after):
        p_log, q_log = p_log.double(), q_log.double()
        allowed = torch.isfinite(p_log)
        terms = torch.where(allowed, p_log.exp() * (p_log - q_log.masked_fill(~allowed, 0.0)), 0.0)
        step = terms.sum(dim=1)
        total = step if total is None else total + step
    if total is None:
        raise ValueError("stepwise_kl needs at least one step")
    return total.mean()


def _entropy(steps: Sequence[Tensor]) -> Tensor:
    """Per-sequence sum over steps of each step distribution's entropy (masked choices contribute 0)."""
    total = torch.zeros(steps[0].shape[0], dtype=torch.float64, device=steps[0].device)
    for log_p in steps:
        log_p = log_p.double()
        total = total - torch.where(torch.isfinite(log_p), log_p.exp() * log_p, 0.0).sum(dim=1)
    return total


def _std(values: Sequence[float]) -> float:
    """Population standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _check_setting(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"ppo.{name}: invalid value (got {value!r}); expected {expected}")


class PPOTrainer:
    """Updates a :class:`Controller` with PPO from batches of evaluated samples.

    Args:
        controller: the policy to train (its ``default_mask_fn`` is used unless ``mask_fn`` is given).
        lr: Adam learning rate (0 freezes the controller: a control whose diagnostics show no learning).
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
        _check_setting("lr", lr, lr >= 0, ">= 0")
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
        """Add ``batch`` to the buffer, run ``epochs`` PPO steps over the buffer; returns diagnostics.

        ``batch`` must be the samples the controller drew since the last update (so that they come from
        the pre-update policy, as the search loop guarantees). Diagnostics (floats), chosen so that a
        learning controller and a stalled one read differently:

        - ``kl``: KL(pre-update || post-update policy), :func:`stepwise_kl` along the new batch (drawn from
          the pre-update policy). Exactly 0 when nothing moved (lr 0, all advantages 0 and no entropy bonus).
        - ``clip_fraction``: share of the new batch with ``|r - 1| > clip``, averaged over the epochs (each
          measured before its step; the first epoch is at ``r = 1``).
        - ``live_share``: share of the buffer whose surrogate still has a gradient at the start of the
          update (1.0 on-policy; with a long buffer, old entries drift out of the clip range).
        - ``entropy``: mean entropy of the pre-update policy along the new batch's paths (an unbiased estimate
          of the policy's sequence entropy); ``entropy_max``: the masked-uniform entropy along the same paths
          (:meth:`Controller.uniform_entropy`); ``entropy_ratio`` = their quotient (about 1 at the start).
        - ``advantage_mean`` / ``advantage_std``: raw advantages ``reward - baseline`` of the new batch;
          ``baseline``: the moving average after absorbing the batch; ``reward_mean`` of the batch.
        - ``policy_loss`` and ``grad_norm`` (before clipping) of the last epoch; ``buffer_size``; ``step``.
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
        batch_actions = [tuple(int(a) for a in sample.actions) for sample in batch]
        batch_masks = self.controller.compute_masks(batch_actions, self.mask_fn)
        baseline_before = self._advance_baseline(rewards)
        advantages = [reward - baseline_before for reward in rewards]
        for sample, actions_tuple, advantage in zip(batch, batch_actions, advantages):
            self._buffer.append(_BufferEntry(actions_tuple, float(sample.log_prob_old), advantage, float(sample.reward)))

        device = self.controller.start.device
        entries = list(self._buffer)
        num_new = min(len(batch), len(entries))  # the newest entries are this batch's (all of it unless it
        new = slice(len(entries) - num_new, len(entries))  # is longer than the buffer)
        actions = torch.tensor([entry.actions for entry in entries], dtype=torch.long, device=device)
        old_log_probs = torch.tensor([entry.log_prob_old for entry in entries], device=device)
        buffer_advantages = torch.tensor([entry.advantage for entry in entries], device=device)
        if self.normalize_advantages and len(entries) > 1:
            std = buffer_advantages.std()
            buffer_advantages = (buffer_advantages - buffer_advantages.mean()) / (std + 1e-8)
        masks = self.controller.compute_masks(actions, self.mask_fn)
        new_actions = torch.tensor(batch_actions[len(batch) - num_new:], dtype=torch.long, device=device)
        new_masks = batch_masks if num_new == len(batch) else self.controller.compute_masks(new_actions, self.mask_fn)

        self.controller.train()
        # The pre-update policy on the new batch (same call shape as the post-update one below, so that a
        # policy that did not move gives bit-identical log-probabilities and a KL of exactly 0).
        with torch.no_grad():
            before_steps = self.controller.step_log_probs(new_actions, masks=new_masks)
        loss_value = 0.0
        grad_norm = 0.0
        live_share = 1.0
        clip_fractions = []
        for epoch in range(self.epochs):
            log_probs, entropies = self.controller.evaluate(actions, masks=masks)
            terms = clipped_surrogate(log_probs, old_log_probs, buffer_advantages, self.clip)
            objective = terms.objective
            if self.entropy_weight:
                # The bonus counts on the same samples as the surrogate: an entry outside the clip range
                # contributes neither. (Averaging it over the whole buffer instead multiplied its weight by
                # about buffer/live samples and let it drown the surrogate's gradient.)
                objective = objective + self.entropy_weight * entropies * terms.live.to(entropies.dtype)
            loss = -objective.mean()
            if epoch == 0:
                live_share = float(terms.live.float().mean())
            clip_fractions.append(float(terms.clipped[new].float().mean()))
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
            after_steps = self.controller.step_log_probs(new_actions, masks=new_masks)
        entropy = float(_entropy(before_steps).mean())
        entropy_max = float(self.controller.uniform_entropy(new_masks, num_new).mean())
        batch_advantages = advantages[len(batch) - num_new:]
        return {
            "kl": float(stepwise_kl(before_steps, after_steps)),
            "clip_fraction": sum(clip_fractions) / len(clip_fractions),
            "live_share": live_share,
            "entropy": entropy,
            "entropy_max": entropy_max,
            "entropy_ratio": entropy / entropy_max if entropy_max > 0 else 1.0,
            "advantage_mean": sum(batch_advantages) / len(batch_advantages),
            "advantage_std": _std(batch_advantages),
            "baseline": float(self.baseline),  # type: ignore[arg-type]
            "reward_mean": sum(rewards) / len(rewards),
            "policy_loss": loss_value,
            "grad_norm": grad_norm,
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
