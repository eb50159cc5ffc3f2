"""PPO trainer (surrogate, baseline, buffer, learning, resume) and the search strategies built on it."""

from __future__ import annotations

import copy
import io
import math
import random
from dataclasses import dataclass

import pytest
import torch

from nasfcos.errors import UserError
from nasfcos.search.config import ControllerConfig, PPOConfig
from nasfcos.search.controller import Controller
from nasfcos.search.ppo import PPOTrainer, Sample, _BufferEntry, clipped_surrogate, stepwise_kl
from nasfcos.search.strategies import (
    PPOStrategy,
    Proposal,
    RandomStrategy,
    Strategy,
    build_strategy,
    state_from_bytes,
    state_to_bytes,
)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------- a tiny stand-in search space


@dataclass(frozen=True)
class TinyGenotype:
    actions: tuple[int, ...]

    def key(self) -> str:
        return "-".join(map(str, self.actions))


class TinySpace:
    """Two decisions (2 and 3 choices); after a first action 0, choice 1 of the second is forbidden."""

    decisions = (("first", 2), ("second", 3))
    valid = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]

    def valid_choices(self, prefix):
        if len(prefix) == 0:
            return (True, True)
        return (True, False, True) if tuple(prefix) == (0,) else (True, True, True)

    def decode(self, actions):
        assert tuple(actions) in self.valid
        return TinyGenotype(tuple(actions))

    def encode(self, genotype):
        return genotype.actions

    def sample(self, rng: random.Random):
        actions: list[int] = []
        for _ in self.decisions:
            actions.append(rng.choice([i for i, ok in enumerate(self.valid_choices(tuple(actions))) if ok]))
        return self.decode(actions)


def real_space(head: str = "sequential"):
    return pytest.importorskip("nasfcos.space.search_space").SearchSpace(head=head)


def roundtrip(state):
    """Through bytes with weights_only=True, as a resumed search reads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- surrogate


def test_clipped_surrogate_matches_hand_values_and_gradients():
    ratios = torch.tensor([1.0, 1.5, 0.5, 1.05, 1.5, 0.5])
    log_probs = ratios.log().requires_grad_(True)
    old = torch.zeros(6)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0, 1.0])
    terms = clipped_surrogate(log_probs, old, adv, clip=0.1)
    # min(r A, clip(r) A): 1, min(1.5, 1.1) = 1.1, min(-0.5, -0.9) = -0.9, -2.1, min(-1.5, -1.1) = -1.5,
    # min(0.5, 0.9) = 0.5
    torch.testing.assert_close(terms.objective.detach(), torch.tensor([1.0, 1.1, -0.9, -2.1, -1.5, 0.5]))
    # Dead = the clip binds in the advantage's direction (r > 1.1 with A > 0, r < 0.9 with A < 0).
    assert terms.live.tolist() == [True, False, False, True, True, True]
    assert terms.clipped.tolist() == [False, True, True, False, True, True]
    (-terms.objective.mean()).backward()
    # d(-mean(r A))/d log r = -r A / n for live samples, 0 for dead ones.
    torch.testing.assert_close(log_probs.grad, torch.tensor([-1.0, 0.0, 0.0, 2.1, 1.5, -0.5]) / 6)


def _sequence_kl_exact(before: Controller, after: Controller) -> float:
    """KL between two controllers' distributions over the 5 valid sequences of TinySpace, by enumeration."""
    with torch.no_grad():
        p = before.evaluate(TinySpace.valid)[0].double()
        q = after.evaluate(TinySpace.valid)[0].double()
    return float((p.exp() * (p - q)).sum())


def test_stepwise_kl_is_exact_per_prefix_unbiased_and_zero_when_unchanged():
    space = TinySpace()
    before = Controller(space, hidden_size=8, init_range=1.0, generator=torch.Generator().manual_seed(0))
    after = Controller(space, hidden_size=8, init_range=1.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Enumerate every valid sequence, weighted by its probability under `before`: the exact expectation.
        steps_p = before.step_log_probs(TinySpace.valid)
        steps_q = after.step_log_probs(TinySpace.valid)
        weights = before.evaluate(TinySpace.valid)[0].double().exp()
        per_sequence = torch.stack([stepwise_kl([s[i:i + 1] for s in steps_p], [s[i:i + 1] for s in steps_q])
                                    for i in range(len(TinySpace.valid))])
        exact = _sequence_kl_exact(before, after)
        assert math.isclose(float((weights * per_sequence).sum()), exact, rel_tol=1e-6)  # float32 policies
        assert bool((per_sequence >= 0).all()) and exact > 0.01
        # Sampled from `before`: the mean estimates the same number.
        actions, _, _ = before.sample(4000, generator=torch.Generator().manual_seed(2))
        estimate = float(stepwise_kl(before.step_log_probs(actions), after.step_log_probs(actions)))
        assert abs(estimate - exact) < 0.05 * exact
        # Unchanged policy: exactly 0.
        assert float(stepwise_kl(steps_p, before.step_log_probs(TinySpace.valid))) == 0.0


def test_entropy_bonus_counts_only_samples_with_a_surrogate_gradient():
    """One step's gradient equals that of the hand-written objective with the bonus masked by the live set."""
    trainer = _trainer(lr=1e-3, entropy_weight=0.5, epochs=1, buffer_size=10)
    controller = trainer.controller
    # An old sample whose frozen log-prob makes it dead now (r >> 1.1 with A > 0), then a live batch.
    trainer._buffer.append(_BufferEntry((1, 2), -20.0, 1.0, 1.0))
    trainer.baseline = 0.5
    batch = [(0, 0), (1, 1)]
    with torch.no_grad():
        lps = controller.evaluate(batch)[0].tolist()
    reference = copy.deepcopy(controller)
    trainer.update([Sample(batch[0], lps[0], 0.0), Sample(batch[1], lps[1], 1.0)])
    # Hand objective: entries (1,2) dead, (0,0) A=-0.5 live, (1,1) A=+0.5 live; bonus only on the live two.
    log_probs, entropies = reference.evaluate([(1, 2), (0, 0), (1, 1)])
    ratio = torch.exp(log_probs - torch.tensor([-20.0, lps[0], lps[1]]))
    adv = torch.tensor([1.0, -0.5, 0.5])
    objective = torch.minimum(ratio * adv, ratio.clamp(0.9, 1.1) * adv) + 0.5 * entropies * torch.tensor([0.0, 1.0, 1.0])
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    (-objective.mean()).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 2.0)
    optimizer.step()
    for a, b in zip(controller.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- baseline and buffer


def _trainer(**kwargs) -> PPOTrainer:
    space = TinySpace()
    controller = Controller(space, hidden_size=8, generator=torch.Generator().manual_seed(0))
    return PPOTrainer(controller, **kwargs)


def test_baseline_initialised_to_first_batch_mean_then_moving_average():
    trainer = _trainer()
    stats = trainer.update([Sample((1, 2), -1.0, 1.0), Sample((0, 0), -1.0, 3.0)])
    # First batch: baseline = mean = 2, advantages -1 and +1; then it absorbs 1 and 3 in order.
    assert stats["advantage_mean"] == 0.0
    assert [e.advantage for e in trainer.buffer] == [-1.0, 1.0]
    assert math.isclose(trainer.baseline, 0.95 * (0.95 * 2 + 0.05 * 1) + 0.05 * 3)
    before = trainer.baseline
    stats = trainer.update([Sample((1, 1), -1.5, 10.0)])
    # Later batches are judged against the baseline before them.
    assert math.isclose(trainer.buffer[-1].advantage, 10.0 - before)
    assert math.isclose(stats["baseline"], 0.95 * before + 0.05 * 10.0)
    assert stats["step"] == 2.0


def test_buffer_keeps_the_latest_samples():
    trainer = _trainer(buffer_size=3)
    batches = [[Sample((0, 0), -1.0, 0.0), Sample((0, 2), -1.0, 1.0)],
               [Sample((1, 0), -1.0, 2.0), Sample((1, 1), -1.0, 3.0)],
               [Sample((1, 2), -1.0, 4.0), Sample((0, 0), -1.0, 5.0)]]
    for batch in batches:
        stats = trainer.update(batch)
    assert [e.actions for e in trainer.buffer] == [(1, 1), (1, 2), (0, 0)]
    assert [e.reward for e in trainer.buffer] == [3.0, 4.0, 5.0]
    assert stats["buffer_size"] == 3.0


def test_invalid_samples_and_settings_are_rejected():
    trainer = _trainer()
    with pytest.raises(ValueError):
        trainer.update([])
    with pytest.raises(ValueError):
        trainer.update([Sample((0, 0), -1.0, float("nan"))])
    with pytest.raises(ValueError, match="not allowed"):
        trainer.update([Sample((0, 0), -1.0, 1.0), Sample((0, 1), -1.0, 1.0)])
    assert trainer.step == 0 and trainer.baseline is None and trainer.buffer == ()  # nothing changed
    with pytest.raises(UserError, match="ppo.clip"):
        _trainer(clip=1.5)


# ---------------------------------------------------------------- learning


def _best_probability(controller: Controller, best) -> float:
    with torch.no_grad():
        return math.exp(float(controller.evaluate([best])[0][0]))


@pytest.mark.parametrize("lr", [1e-4, 1e-2])
def test_one_update_raises_probability_of_rewarded_action(lr):
    trainer = _trainer(lr=lr)
    controller = trainer.controller
    best = (1, 2)
    actions = (TinySpace.valid * 4)[:16]  # (1, 2) appears 3 times among 16
    with torch.no_grad():
        old = controller.evaluate(actions)[0].tolist()
    batch = [Sample(a, lp, 1.0 if a == best else 0.0) for a, lp in zip(actions, old)]
    others_before = {a: _best_probability(controller, a) for a in TinySpace.valid if a != best}
    before = _best_probability(controller, best)
    stats = trainer.update(batch)
    after = _best_probability(controller, best)
    assert after > before
    assert sum(_best_probability(controller, a) for a in others_before) < sum(others_before.values())
    assert stats["kl"] > 0 and 0.0 <= stats["clip_fraction"] <= 1.0
    assert stats["live_share"] == 1.0  # on-policy: every sample starts at r = 1
    assert stats["grad_norm"] > 0


def test_ppo_strategy_learns_the_best_architecture():
    space = TinySpace()
    strategy = PPOStrategy(space, seed=0, controller=ControllerConfig(hidden_size=16), ppo=PPOConfig(lr=2e-2))
    start = _best_probability(strategy.controller, (0, 2))
    for _ in range(25):
        proposals = strategy.propose(4)
        strategy.observe([(p, 1.0 if p.actions == (0, 2) else 0.0) for p in proposals])
    assert start < 0.35 and _best_probability(strategy.controller, (0, 2)) > 0.8
    assert strategy.greedy().actions == (0, 2)


# ---------------------------------------------------------------- resume


def test_trainer_state_dict_roundtrip_gives_identical_next_update():
    trainer = _trainer(lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        with torch.no_grad():
            actions, lps, _ = trainer.controller.sample(4, generator=g)
        trainer.update([Sample(tuple(a), lp, float(sum(a)) + step) for a, lp in zip(actions.tolist(), lps.tolist())])
    state = roundtrip(trainer.state_dict())
    other = _trainer(lr=1e-2)
    other.controller.reset_parameters(torch.Generator().manual_seed(99))
    other.load_state_dict(state)
    assert other.baseline == trainer.baseline and other.step == trainer.step and other.buffer == trainer.buffer
    batch = [Sample((1, 1), -1.7, 2.0), Sample((0, 2), -1.2, 0.5)]
    assert trainer.update(batch) == other.update(batch)
    for a, b in zip(trainer.controller.parameters(), other.controller.parameters()):
        assert torch.equal(a, b)


def _run(strategy: Strategy, rounds: int, n: int = 3) -> list[list[str]]:
    """Propose/observe with a deterministic reward; returns the keys proposed each round."""
    keys = []
    for _ in range(rounds):
        proposals = strategy.propose(n)
        keys.append([p.genotype.key() for p in proposals])
        strategy.observe([(p, -float(sum(p.actions)) / len(p.actions)) for p in proposals])
    return keys


def _small(kind: str, space, seed: int) -> Strategy:
    """A strategy with a smaller controller (fast tests; the behaviour under test does not depend on size)."""
    return build_strategy(kind, space, seed=seed, controller=ControllerConfig(hidden_size=24), ppo=PPOConfig(epochs=2))


@pytest.mark.parametrize("kind", ["ppo", "random"])
def test_same_seed_same_genotypes_on_the_real_space(kind):
    space = real_space()
    first = _run(_small(kind, space, seed=11), rounds=3)
    second = _run(_small(kind, space, seed=11), rounds=3)
    other = _run(_small(kind, space, seed=12), rounds=3)
    assert first == second
    assert first != other


@pytest.mark.parametrize("kind", ["ppo", "random"])
@pytest.mark.parametrize("head", ["sequential", "cell"])
def test_resumed_strategy_proposes_what_the_original_would(kind, head):
    space = real_space(head)
    original = _small(kind, space, seed=5)
    _run(original, rounds=2)
    blob = state_to_bytes(original)
    resumed = _small(kind, space, seed=1234)
    state_from_bytes(resumed, blob)
    for _ in range(2):
        a, b = original.propose(3), resumed.propose(3)
        assert [p.actions for p in a] == [p.actions for p in b]
        assert [p.log_prob for p in a] == [p.log_prob for p in b]
        rewards = [random.Random(sum(p.actions)).random() for p in a]
        assert original.observe(list(zip(a, rewards))) == resumed.observe(list(zip(b, rewards)))
    for p in a:
        space.decode(p.actions).validate()
        assert p.genotype == space.decode(p.actions)


def test_random_strategy_log_prob_is_masked_uniform():
    strategy = RandomStrategy(TinySpace(), seed=0)
    proposals = strategy.propose(40)
    assert {p.actions for p in proposals} == set(TinySpace.valid)
    for p in proposals:
        expected = math.log(1 / 2) + (math.log(1 / 2) if p.actions[0] == 0 else math.log(1 / 3))
        assert math.isclose(p.log_prob, expected)
        assert p.genotype == TinyGenotype(p.actions)


def test_ppo_proposal_log_prob_is_the_controllers():
    strategy = PPOStrategy(TinySpace(), seed=2, controller=ControllerConfig(hidden_size=8))
    proposals = strategy.propose(6)
    assert isinstance(proposals[0], Proposal) and isinstance(strategy, Strategy)
    with torch.no_grad():
        lps = strategy.controller.evaluate([p.actions for p in proposals])[0].tolist()
    assert [p.log_prob for p in proposals] == lps


def test_strategy_errors_are_user_errors():
    space = TinySpace()
    with pytest.raises(UserError, match="unknown strategy"):
        build_strategy("evolution", space)
    random_state = RandomStrategy(space, 0).state_dict()
    with pytest.raises(UserError, match="cannot resume"):
        PPOStrategy(space, 0, controller=ControllerConfig(hidden_size=8)).load_state_dict(random_state)
    with pytest.raises(UserError, match="cannot load"):
        state_from_bytes(RandomStrategy(space, 0), b"not a torch file")


# ---------------------------------------------------------------- diagnostics: learning vs stalled


def _dcn_reward(genotype) -> float:
    """Half the share of dcn3x3 FPN ops plus half the share of concat aggregations (optimum 1)."""
    ops = [op for cell in genotype.fpn for op in (cell.op1, cell.op2)]
    return 0.5 * ops.count("dcn3x3") / len(ops) + 0.5 * sum(c.agg == "concat" for c in genotype.fpn) / len(genotype.fpn)


def _diagnostics(reward, updates: int, buffer_size: int = 8, **settings) -> list[dict[str, float]]:
    """The real controller and trainer on the real space, batches of 8 (lr 0 is a trainer-level control)."""
    space = real_space()
    generator = torch.Generator().manual_seed(0)
    controller = Controller(space, generator=generator)
    trainer = PPOTrainer(controller, buffer_size=buffer_size, **settings)
    history = []
    for _ in range(updates):
        with torch.no_grad():
            actions, log_probs, _ = controller.sample(8, generator=generator)
        batch = [Sample(tuple(a), lp, reward(space.decode(a))) for a, lp in zip(actions.tolist(), log_probs.tolist())]
        history.append(trainer.update(batch))
    return history


def test_diagnostics_tell_a_learning_controller_from_stalled_ones():
    learning = _diagnostics(_dcn_reward, 12, lr=3e-3, normalize_advantages=True)
    frozen = _diagnostics(_dcn_reward, 4, lr=0.0)
    flat = _diagnostics(lambda genotype: 0.25, 4, lr=3e-3)
    # A controller that did not move: KL exactly 0, nothing clipped, entropy where it started.
    for run in (frozen, flat):
        assert all(d["kl"] == 0.0 and d["clip_fraction"] == 0.0 for d in run)
        assert all(d["advantage_std"] == 0.0 for d in flat)
        assert all(0.98 < d["entropy_ratio"] <= 1.0 + 1e-9 for d in run)
        assert run[-1]["baseline"] == run[0]["baseline"] or run is frozen
    # One that learns: KL clearly > 0 every update, entropy falls well below its maximum, the baseline rises.
    assert all(d["kl"] > 1e-3 for d in learning)
    assert learning[0]["entropy_ratio"] > 0.98 and learning[-1]["entropy_ratio"] < 0.9
    assert learning[-1]["baseline"] > learning[0]["baseline"] + 0.1
    assert all(d["live_share"] == 1.0 for d in learning)  # buffer = batch: on-policy


def test_entropy_max_is_the_masked_uniform_entropy_of_the_new_batch():
    trainer = _trainer()
    stats = trainer.update([Sample((0, 2), -1.0, 1.0), Sample((1, 1), -1.0, 0.0), Sample((1, 0), -1.0, 0.5)])
    # first = 0 leaves 2 choices for the second decision, first = 1 leaves 3; the first has 2.
    expected = (math.log(2) + math.log(2) + 2 * (math.log(2) + math.log(3))) / 3
    assert math.isclose(stats["entropy_max"], expected, rel_tol=1e-12)
    assert stats["entropy"] <= stats["entropy_max"] + 1e-6
    assert math.isclose(stats["advantage_std"], math.sqrt(((0.5) ** 2 + 0.5 ** 2 + 0) / 3))


def test_live_share_drops_when_the_buffer_outlives_the_batch():
    """With a buffer 4x the batch, old entries drift out of the clip range: the live share says so."""
    shares = [d["live_share"] for d in _diagnostics(_dcn_reward, 8, buffer_size=32, lr=3e-3)]
    assert shares[0] == 1.0 and min(shares[4:]) < 0.6
