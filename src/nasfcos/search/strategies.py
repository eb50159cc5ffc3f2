"""Search strategies: what proposes the next architectures and learns from their rewards.

The search loop only talks to the :class:`Strategy` protocol: ``propose(n)`` candidates, evaluate them (in
parallel if the executor can), ``observe`` their rewards, and checkpoint ``state_dict()`` together with the
results (``ResultStore.commit_step``). Two strategies over the same space and budget make the paper's
comparison possible:

- :class:`PPOStrategy` — the paper's: an LSTM :class:`~nasfcos.search.controller.Controller` trained with
  :class:`~nasfcos.search.ppo.PPOTrainer`. One ``observe`` call is one PPO update over the batch it is given
  (batches of one reproduce "an update after every architecture").
- :class:`RandomStrategy` — the baseline: uniform sampling with the space's masked sampler.

Reproducibility: a strategy owns its random source, seeded from ``seed`` (a ``torch.Generator`` for PPO,
``random.Random`` for random search), and that source's state is part of ``state_dict``. The same seed and the
same rewards give the same sequence of genotypes, and a strategy restored from a state dict proposes exactly
what the original would have proposed next. Strategies do not de-duplicate: the loop looks keys up in the
results store and re-uses a known reward (the controller still learns from the repeated sample).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from nasfcos.errors import UserError
from nasfcos.search.config import ControllerConfig, PPOConfig
from nasfcos.search.controller import Controller
from nasfcos.search.ppo import PPOTrainer, Sample


@dataclass(frozen=True)
class Proposal:
    """A candidate to evaluate: its actions, the decoded genotype and the log-probability it was drawn with."""

    actions: tuple[int, ...]
    genotype: Any
    log_prob: float


@runtime_checkable
class Strategy(Protocol):
    """What the search loop needs from a search strategy."""

    def propose(self, n: int) -> list[Proposal]:
        """The next ``n`` candidates (they may repeat earlier ones)."""
        ...

    def observe(self, results: Sequence[tuple[Proposal, float]]) -> dict[str, float]:
        """Learn from evaluated candidates; returns statistics for the log (may be empty)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def _masked_uniform_log_prob(space: Any, actions: Sequence[int]) -> float:
    """Log-probability of ``actions`` under "uniform among the allowed choices at every step"."""
    total = 0.0
    for t in range(len(actions)):
        total -= math.log(sum(1 for allowed in space.valid_choices(tuple(actions[:t])) if allowed))
    return total


class RandomStrategy:
    """Uniform random search with the space's masked sampler and ``random.Random(seed)``.

    ``log_prob`` of a proposal is its log-probability under the masked-uniform sampler (uniform among the
    allowed choices at each step), for logging only.
    """

    kind = "random"

    def __init__(self, space: Any, seed: int = 0) -> None:
        self.space = space
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        self.num_proposed = 0

    def propose(self, n: int) -> list[Proposal]:
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        proposals = []
        for _ in range(n):
            sampled = self.space.sample(self.rng)
            if hasattr(sampled, "key"):  # a Genotype
                genotype, actions = sampled, tuple(self.space.encode(sampled))
            else:  # an action sequence
                actions = tuple(int(a) for a in sampled)
                genotype = self.space.decode(actions)
            proposals.append(Proposal(actions, genotype, _masked_uniform_log_prob(self.space, actions)))
        self.num_proposed += n
        return proposals

    def observe(self, results: Sequence[tuple[Proposal, float]]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = self.rng.getstate()
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_proposed": self.num_proposed,
            "rng_state": [version, list(internal), gauss_next],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        version, internal, gauss_next = state["rng_state"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
        self.seed = int(state["seed"])
        self.num_proposed = int(state["num_proposed"])


class PPOStrategy:
    """The paper's strategy: an LSTM controller trained with PPO on the rewards of its own samples.

    ``controller`` and ``ppo`` are the :class:`~nasfcos.search.config.ControllerConfig` /
    :class:`~nasfcos.search.config.PPOConfig` of the run (their fields are the keyword arguments of
    :class:`Controller` / :class:`PPOTrainer`; the defaults are written there, once). The controller's initial
    weights and every sample come from one ``torch.Generator`` seeded with ``seed``. Sampling and updates run
    with one intra-op thread (:func:`single_thread`).
    """

    kind = "ppo"

    def __init__(self, space: Any, seed: int = 0, *, controller: ControllerConfig = ControllerConfig(),
                 ppo: PPOConfig = PPOConfig()) -> None:
        self.space = space
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.controller = Controller(space, **_settings(controller), generator=self.generator)
        self.trainer = PPOTrainer(self.controller, **_settings(ppo))
        self.num_proposed = 0
        self.last_stats: dict[str, float] = {}

    def propose(self, n: int) -> list[Proposal]:
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        with torch.no_grad(), single_thread():
            actions, log_probs, _ = self.controller.sample(n, generator=self.generator)
        proposals = []
        for row, log_prob in zip(actions.tolist(), log_probs.tolist()):
            actions_tuple = tuple(int(a) for a in row)
            proposals.append(Proposal(actions_tuple, self.space.decode(actions_tuple), float(log_prob)))
        self.num_proposed += n
        return proposals

    def greedy(self) -> Proposal:
        """The controller's step-by-step most likely architecture (does not touch the random state)."""
        with torch.no_grad():
            actions, log_probs, _ = self.controller.sample(1, greedy=True)
        actions_tuple = tuple(int(a) for a in actions[0].tolist())
        return Proposal(actions_tuple, self.space.decode(actions_tuple), float(log_probs[0]))

    def observe(self, results: Sequence[tuple[Proposal, float]]) -> dict[str, float]:
        """One PPO update on the given evaluated proposals (in order)."""
        if not results:
            return {}
        batch = [Sample(proposal.actions, proposal.log_prob, float(reward)) for proposal, reward in results]
        with single_thread():
            self.last_stats = self.trainer.update(batch)
        return self.last_stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "num_proposed": self.num_proposed,
            "generator": self.generator.get_state(),
            "trainer": self.trainer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.trainer.load_state_dict(state["trainer"])
        self.generator.set_state(state["generator"])
        self.seed = int(state["seed"])
        self.num_proposed = int(state["num_proposed"])


STRATEGIES: dict[str, type] = {"ppo": PPOStrategy, "random": RandomStrategy}


def build_strategy(name: str, space: Any, seed: int = 0, *, controller: ControllerConfig = ControllerConfig(),
                   ppo: PPOConfig = PPOConfig()) -> Strategy:
    """Construct a strategy by name (``"ppo"`` or ``"random"``; random search ignores ``controller`` and
    ``ppo``); unknown names are a user error."""
    if name not in STRATEGIES:
        raise UserError(f"search.strategy: unknown strategy (got {name!r}); expected one of {sorted(STRATEGIES)}")
    if name == "random":
        return RandomStrategy(space, seed)
    return PPOStrategy(space, seed, controller=controller, ppo=ppo)


def _settings(cfg: Any) -> dict[str, Any]:
    """A config dataclass's fields as keyword arguments (shallow: no copies)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the controller with one intra-op thread: it is a tiny LSTM, and on a busy machine torch's thread
    synchronisation made a PPO update ~30x slower than single-threaded (it also keeps its numerics identical
    whatever the machine's thread setting)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    found = state.get("kind")
    if found != kind:
        raise UserError(f"search state: saved by strategy {found!r}, cannot resume it as {kind!r}")


def state_to_bytes(strategy: Strategy) -> bytes:
    """Serialize a strategy's state (``torch.save``) for ``ResultStore.commit_step``."""
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    return buffer.getvalue()


def state_from_bytes(strategy: Strategy, blob: bytes) -> None:
    """Restore a strategy from :func:`state_to_bytes` output (loaded with ``weights_only=True``)."""
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign blob
        raise UserError(f"search state: cannot load the saved strategy state ({type(exc).__name__}: {exc})") from None
    strategy.load_state_dict(state)
