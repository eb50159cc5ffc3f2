"""The LSTM policy that proposes architectures, one decision at a time.

NAS-FCOS (Sec. 3.3) follows Nekrasov et al. (nas-segm): a 2-layer LSTM with hidden size 100 whose parameters
start uniform in (-0.1, 0.1), a learnable start input, and one linear softmax head per decision position sized
to that decision's number of choices (a connection decision has as many outputs as the pool has entries).

Two deliberate choices where nas-segm differs (FACTS 5):

- **Sampled actions condition later decisions.** nas-segm feeds the LSTM output back as the next input, so
  the policy is effectively a product of independent per-position distributions. Here the sampled action at
  position ``t`` is looked up in a per-position embedding table and fed as the input of step ``t + 1``
  (ENAS style), so the policy can learn correlations such as "this op goes with that input".
- **Masked sampling.** A search space rejects some action sequences (a cell reading a pool entry that does not
  exist yet, an FPN with fewer than three unconsumed outputs). Instead of sampling and rejecting, the policy
  asks ``mask_fn(prefix)`` (``SearchSpace.valid_choices``) for the choices allowed after the actions taken so
  far, sets the other logits to ``-inf`` and samples from the renormalised distribution. Log-probabilities
  and entropies are those of the masked distribution, so PPO's ratios are exact and every sample decodes.
  When the controller is built from a space with incremental cursors (``space.start()`` returning an object
  with ``mask()`` and ``push(action)``, as :class:`~nasfcos.space.search_space.SearchSpace` does) and no
  explicit ``mask_fn`` is passed, one cursor per sample is walked along instead of replaying every prefix
  (O(D) instead of O(D^2) per sequence); both give the same masks.

The start input is a learnable vector initialised to zero (nas-segm's "learnable zero start input"); every
other parameter is uniform in ``(-init_range, init_range)``.

Logit shaping follows ENAS: ``logits / temperature`` first, then ``tanh_constant * tanh(.)`` if a tanh
constant is given (it bounds the logits and so keeps some exploration late in the search).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

MaskFn = Callable[[tuple[int, ...]], Sequence[bool]]


def _decision_specs(decisions: Any) -> tuple[tuple[str, int], ...]:
    """Normalise ``[(name, n), ...]`` or ``[Decision(name, num_choices), ...]`` to name/count pairs."""
    specs: list[tuple[str, int]] = []
    for index, decision in enumerate(decisions):
        if hasattr(decision, "num_choices"):
            name, count = str(getattr(decision, "name", f"d{index}")), int(decision.num_choices)
        else:
            name, count = decision
            name, count = str(name), int(count)
        if count < 1:
            raise ValueError(f"decision {index} ({name!r}) has {count} choices; expected at least 1")
        specs.append((name, count))
    if not specs:
        raise ValueError("a controller needs at least one decision")
    return tuple(specs)


def _is_search_space(obj: Any) -> bool:
    return hasattr(obj, "decisions") and hasattr(obj, "valid_choices")


class Controller(nn.Module):
    """Autoregressive LSTM policy over a fixed sequence of categorical decisions.

    Args:
        decisions: a :class:`~nasfcos.space.search_space.SearchSpace` (its ``decisions`` are used and its
            ``valid_choices`` becomes the default mask) or a sequence of ``(name, num_choices)`` pairs /
            ``Decision`` objects.
        hidden_size: LSTM hidden size (nas-segm: 100).
        num_layers: LSTM layers (nas-segm: 2).
        embedding_size: size of the start input and of the action embeddings; defaults to ``hidden_size``.
        temperature: logits are divided by it before the softmax.
        tanh_constant: if given, logits become ``tanh_constant * tanh(logits / temperature)``.
        init_range: parameters start uniform in ``(-init_range, init_range)``.
        generator: random source for the initial parameters (so a seeded search is reproducible).
    """

    def __init__(
        self,
        decisions: Any,
        hidden_size: int = 100,
        num_layers: int = 2,
        embedding_size: int | None = None,
        temperature: float = 1.0,
        tanh_constant: float | None = None,
        init_range: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        space = decisions if _is_search_space(decisions) else None
        specs = _decision_specs(space.decisions if space is not None else decisions)
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1 (got {hidden_size}, {num_layers})")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        if tanh_constant is not None and tanh_constant <= 0:
            raise ValueError(f"tanh_constant must be > 0 or None (got {tanh_constant})")
        embedding_size = hidden_size if embedding_size is None else int(embedding_size)
        self.decision_names: tuple[str, ...] = tuple(name for name, _ in specs)
        self.num_choices: tuple[int, ...] = tuple(count for _, count in specs)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.embedding_size = embedding_size
        self.temperature = float(temperature)
        self.tanh_constant = None if tanh_constant is None else float(tanh_constant)
        self.init_range = float(init_range)
        #: mask used when a call passes none: the search space's ``valid_choices`` (or no masking).
        self.default_mask_fn: MaskFn | None = space.valid_choices if space is not None else None
        self._cursor_factory: Callable[[], Any] | None = (
            space.start if space is not None and callable(getattr(space, "start", None)) else None
        )

        self.start = nn.Parameter(torch.zeros(embedding_size))
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers)
        # The action at the last position is never fed back, so it needs no embedding table.
        self.embeddings = nn.ModuleList(nn.Embedding(count, embedding_size) for count in self.num_choices[:-1])
        self.heads = nn.ModuleList(nn.Linear(hidden_size, count) for count in self.num_choices)
        self.reset_parameters(generator)

    @property
    def num_decisions(self) -> int:
        return len(self.num_choices)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform ``(-init_range, init_range)`` everywhere except the zero start input."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name == "start":
                    parameter.zero_()
                else:
                    parameter.uniform_(-self.init_range, self.init_range, generator=generator)

    # ------------------------------------------------------------------ public API

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        mask_fn: MaskFn | None = None,
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample ``n`` action sequences (batched) from the masked policy.

        Returns ``(actions LongTensor[n, D], log_probs [n], entropies [n])``; log-probabilities and entropies
        are sums over positions of the masked per-step distributions. They carry gradients when grad mode is
        on (wrap the call in ``torch.no_grad()`` to just sample). ``mask_fn`` defaults to the space's mask.
        ``greedy=True`` takes the most likely allowed choice at every step instead of sampling.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        return self._rollout(n, None, generator, self._masker(n, mask_fn), greedy)

    def evaluate(
        self,
        actions: Tensor | Sequence[Sequence[int]],
        mask_fn: MaskFn | None = None,
        masks: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Log-probabilities and entropies of given action sequences under the current policy.

        Teacher forcing: the given actions are fed back instead of sampled ones, with the same masking as
        :meth:`sample`, so ``evaluate(sample(...)[0])`` reproduces ``sample``'s log-probabilities. ``masks``
        (from :meth:`compute_masks`) skips recomputing the masks when the same actions are evaluated
        repeatedly (PPO's epochs). Raises ``ValueError`` if an action is out of range or masked out.
        """
        actions_t = self._as_actions(actions)
        n = actions_t.shape[0]
        masker = _FixedMasks(masks, self.num_decisions) if masks is not None else self._masker(n, mask_fn)
        _, log_probs, entropies = self._rollout(n, actions_t, None, masker, False)
        return log_probs, entropies

    def step_log_probs(
        self,
        actions: Tensor | Sequence[Sequence[int]],
        mask_fn: MaskFn | None = None,
        masks: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor]:
        """The full per-step distributions along given action sequences (teacher forcing, as :meth:`evaluate`).

        Returns one ``[n, num_choices[t]]`` tensor of masked log-probabilities per decision (``-inf`` where the
        mask forbids a choice). Two policies' step distributions along the same prefixes give their KL exactly
        per step; summed over steps and averaged over prefixes drawn from the first policy, that is an
        unbiased, never negative estimate of the KL between the two sequence distributions (the chain rule).
        """
        actions_t = self._as_actions(actions)
        n = actions_t.shape[0]
        masker = _FixedMasks(masks, self.num_decisions) if masks is not None else self._masker(n, mask_fn)
        steps: list[Tensor] = []
        self._rollout(n, actions_t, None, masker, False, steps)
        return steps

    def compute_masks(
        self, actions: Tensor | Sequence[Sequence[int]], mask_fn: MaskFn | None = None
    ) -> list[Tensor | None]:
        """The per-position boolean masks ``[n, num_choices[t]]`` along ``actions`` (``None``: no mask)."""
        actions_t = self._as_actions(actions)
        masker = self._masker(actions_t.shape[0], mask_fn)
        result: list[Tensor | None] = []
        for t in range(self.num_decisions):
            mask = masker.masks(t)
            if mask is not None:
                self._check_mask(t, mask)
                self._check_actions(t, actions_t[:, t], mask)
            result.append(mask)
            masker.push(actions_t[:, t].tolist())
        return result

    def uniform_entropy(self, masks: Sequence[Tensor | None], n: int) -> Tensor:
        """Per-sequence ``sum_t log(#allowed choices at t)`` along the ``n`` paths of ``masks`` (:meth:`compute_masks`).

        That is the entropy of the *masked uniform* policy (uniform among the allowed choices at every step)
        along each path, the most a per-step distribution can have there; the controller starts close to it
        (small uniform weights). Its mean over sequences drawn from a policy is the yardstick for that
        policy's entropy: a learning controller moves away from it, a stalled one stays near it. ``None``
        masks mean "every choice allowed". (The log of the number of valid sequences, ``log(space.size())``,
        is larger: masking makes per-step uniform sampling non-uniform over whole sequences.)
        """
        if len(masks) != self.num_decisions:
            raise ValueError(f"masks must have {self.num_decisions} entries (got {len(masks)})")
        total = torch.zeros(n, dtype=torch.float64)
        for count, mask in zip(self.num_choices, masks):
            if mask is None:
                total += math.log(count)
            else:
                total += mask.sum(dim=1).to(device="cpu", dtype=torch.float64).log()
        return total

    # ------------------------------------------------------------------ internals

    def _masker(self, n: int, mask_fn: MaskFn | None) -> _Masker:
        device = self.start.device
        if mask_fn is None and self._cursor_factory is not None:
            return _CursorMasks(self._cursor_factory, n, device)
        fn = self.default_mask_fn if mask_fn is None else mask_fn
        if fn is None:
            return _NoMasks()
        return _PrefixMasks(fn, n, device)

    def _as_actions(self, actions: Tensor | Sequence[Sequence[int]]) -> Tensor:
        actions_t = torch.as_tensor(actions, dtype=torch.long, device=self.start.device)
        if actions_t.dim() != 2 or actions_t.shape[1] != self.num_decisions or actions_t.shape[0] < 1:
            raise ValueError(
                f"actions must have shape [n >= 1, {self.num_decisions}] (got {tuple(actions_t.shape)})"
            )
        return actions_t

    def _shape_logits(self, logits: Tensor) -> Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.tanh_constant is not None:
            logits = self.tanh_constant * torch.tanh(logits)
        return logits

    def _check_mask(self, t: int, mask: Tensor) -> None:
        """A mask must have one entry per choice and allow at least one (else sampling is impossible)."""
        count = self.num_choices[t]
        if mask.dim() != 2 or mask.shape[1] != count:
            raise ValueError(
                f"mask for decision {t} ({self.decision_names[t]!r}) has shape {tuple(mask.shape)}; "
                f"expected [n, {count}]"
            )
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            row = int(empty.nonzero()[0, 0])
            raise ValueError(f"mask for decision {t} ({self.decision_names[t]!r}) of sequence {row} allows no choice")

    def _rollout(
        self,
        n: int,
        actions: Tensor | None,
        generator: torch.Generator | None,
        masker: _Masker,
        greedy: bool,
        steps: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the LSTM over all positions, sampling (``actions is None``) or teacher-forcing; ``steps``
        (if given) collects each position's masked log-probabilities."""
        device = self.start.device
        num_decisions = self.num_decisions
        chosen = torch.empty(n, num_decisions, dtype=torch.long, device=device)
        log_prob_sum = torch.zeros(n, device=device)
        entropy_sum = torch.zeros(n, device=device)
        step_input = self.start.expand(n, -1).unsqueeze(0)  # [seq=1, n, E]
        state: tuple[Tensor, Tensor] | None = None
        for t in range(num_decisions):
            output, state = self.lstm(step_input, state)
            logits = self._shape_logits(self.heads[t](output[0]))
            mask = masker.masks(t)
            if mask is not None:
                self._check_mask(t, mask)
                logits = logits.masked_fill(~mask, float("-inf"))
            log_p = torch.log_softmax(logits, dim=-1)
            if steps is not None:
                steps.append(log_p)
            if actions is None:
                if greedy:
                    action = log_p.detach().argmax(dim=-1)
                else:
                    action = torch.multinomial(log_p.detach().exp(), 1, generator=generator).squeeze(1)
            else:
                action = actions[:, t]
                self._check_actions(t, action, mask)
            chosen[:, t] = action
            log_prob_sum = log_prob_sum + log_p.gather(1, action.unsqueeze(1)).squeeze(1)
            # 0 * log 0 = 0 for masked choices; masking log_p (not the product) keeps gradients finite.
            safe_log_p = log_p if mask is None else log_p.masked_fill(~mask, 0.0)
            entropy_sum = entropy_sum - (log_p.exp() * safe_log_p).sum(dim=-1)
            if t + 1 < num_decisions:
                masker.push(action.tolist())
                step_input = self.embeddings[t](action).unsqueeze(0)
        return chosen, log_prob_sum, entropy_sum

    def _check_actions(self, t: int, action: Tensor, mask: Tensor | None) -> None:
        count = self.num_choices[t]
        bad_range = (action < 0) | (action >= count)
        if bool(bad_range.any()):
            row = int(bad_range.nonzero()[0, 0])
            raise ValueError(
                f"action {int(action[row])} at decision {t} ({self.decision_names[t]!r}) of sequence {row} "
                f"is out of range 0..{count - 1}"
            )
        if mask is not None:
            allowed = mask.gather(1, action.unsqueeze(1)).squeeze(1)
            if not bool(allowed.all()):
                row = int((~allowed).nonzero()[0, 0])
                raise ValueError(
                    f"action {int(action[row])} at decision {t} ({self.decision_names[t]!r}) of sequence {row} "
                    "is not allowed by the mask given the earlier actions"
                )


# ---------------------------------------------------------------------- maskers
# A masker yields the [n, C_t] boolean mask of step t for every sequence in the batch, then is told the
# actions taken at that step. Masks are stacked with one torch.tensor call per step.


class _Masker(Protocol):
    def masks(self, t: int) -> Tensor | None: ...

    def push(self, taken: list[int]) -> None: ...


class _NoMasks:
    def masks(self, t: int) -> Tensor | None:
        return None

    def push(self, taken: list[int]) -> None:
        pass


class _FixedMasks:
    """Masks precomputed by :meth:`Controller.compute_masks`."""

    def __init__(self, masks: Sequence[Tensor | None], num_decisions: int) -> None:
        if len(masks) != num_decisions:
            raise ValueError(f"masks must have {num_decisions} entries (got {len(masks)})")
        self._masks = masks

    def masks(self, t: int) -> Tensor | None:
        return self._masks[t]

    def push(self, taken: list[int]) -> None:
        pass


class _PrefixMasks:
    """Calls ``mask_fn(prefix)`` once per distinct prefix (sequences sharing a prefix share the call)."""

    def __init__(self, mask_fn: MaskFn, n: int, device: torch.device) -> None:
        self._fn = mask_fn
        self._device = device
        self._prefixes: list[tuple[int, ...]] = [()] * n
        self._cache: dict[tuple[int, ...], tuple[bool, ...]] = {}

    def masks(self, t: int) -> Tensor:
        rows = []
        for prefix in self._prefixes:
            row = self._cache.get(prefix)
            if row is None:
                row = tuple(bool(x) for x in self._fn(prefix))
                self._cache[prefix] = row
            rows.append(row)
        return _stack(rows, t, self._device)

    def push(self, taken: list[int]) -> None:
        self._prefixes = [prefix + (a,) for prefix, a in zip(self._prefixes, taken)]


class _CursorMasks:
    """One incremental cursor (``space.start()``: ``mask()``, ``push(a)``) per sequence."""

    def __init__(self, start: Callable[[], Any], n: int, device: torch.device) -> None:
        self._cursors = [start() for _ in range(n)]
        self._device = device

    def masks(self, t: int) -> Tensor:
        return _stack([tuple(cursor.mask()) for cursor in self._cursors], t, self._device)

    def push(self, taken: list[int]) -> None:
        for cursor, action in zip(self._cursors, taken):
            cursor.push(action)


def _stack(rows: list[tuple[bool, ...]], t: int, device: torch.device) -> Tensor:
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise ValueError(f"masks for decision {t} have different numbers of entries")
    return torch.tensor(rows, dtype=torch.bool, device=device)
