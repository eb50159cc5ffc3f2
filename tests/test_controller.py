"""Controller: masked sampling validity, hand-computed log-probabilities, teacher forcing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nasfcos.search.controller import Controller

# A tiny space: decision 0 has 2 choices, decision 1 has 3; after action 0 = 0, choice 1 is forbidden.
TINY = [("first", 2), ("second", 3)]


def tiny_mask(prefix: tuple[int, ...]) -> tuple[bool, ...]:
    if len(prefix) == 0:
        return (True, True)
    if prefix == (0,):
        return (True, False, True)
    return (True, True, True)


TINY_VALID = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _scrambled(controller: Controller, seed: int = 3) -> Controller:
    """Larger random weights (and a non-zero start input) so that hand and module results are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 1.0)
    return controller


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = gates.chunk(4)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


@torch.no_grad()
def hand_log_prob(controller: Controller, actions, mask_fn, temperature=1.0, tanh_constant=None):
    """Run the two-layer LSTM cell by cell with the module's weights, mask, softmax, sum log-probs."""
    lstm = controller.lstm
    hidden = controller.hidden_size
    h = [torch.zeros(hidden) for _ in range(lstm.num_layers)]
    c = [torch.zeros(hidden) for _ in range(lstm.num_layers)]
    x = controller.start.detach()
    total = 0.0
    for t, action in enumerate(actions):
        layer_input = x
        for layer in range(lstm.num_layers):
            h[layer], c[layer] = _lstm_cell(
                layer_input, h[layer], c[layer],
                getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"),
                getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"),
            )
            layer_input = h[layer]
        head = controller.heads[t]
        logits = head.weight @ layer_input + head.bias
        logits = logits / temperature
        if tanh_constant is not None:
            logits = tanh_constant * torch.tanh(logits)
        allowed = mask_fn(tuple(actions[:t]))
        exp = [math.exp(float(v)) if ok else 0.0 for v, ok in zip(logits, allowed)]
        total += math.log(exp[action] / sum(exp))
        if t + 1 < len(actions):
            x = controller.embeddings[t].weight[action].detach()
    return total


def test_default_shapes_and_init_range():
    controller = Controller([("a", 4), ("b", 7), ("c", 2)], generator=torch.Generator().manual_seed(0))
    assert controller.lstm.hidden_size == 100 and controller.lstm.num_layers == 2
    assert [head.out_features for head in controller.heads] == [4, 7, 2]
    assert [emb.num_embeddings for emb in controller.embeddings] == [4, 7]
    assert torch.count_nonzero(controller.start) == 0
    values = torch.cat([p.detach().flatten() for name, p in controller.named_parameters() if name != "start"])
    # uniform(-0.1, 0.1): bounded by 0.1, standard deviation 0.1 / sqrt(3)
    assert values.abs().max() <= 0.1 and values.abs().max() > 0.099
    assert abs(float(values.std()) - 0.1 / math.sqrt(3)) < 0.002 and abs(float(values.mean())) < 0.002


@pytest.mark.parametrize("temperature,tanh_constant", [(1.0, None), (2.0, 2.5)])
def test_log_probs_match_hand_computation(temperature, tanh_constant):
    controller = _scrambled(
        Controller(TINY, hidden_size=5, embedding_size=4, temperature=temperature, tanh_constant=tanh_constant)
    )
    hand = [hand_log_prob(controller, a, tiny_mask, temperature, tanh_constant) for a in TINY_VALID]
    expected = torch.tensor(hand)
    with torch.no_grad():
        log_probs, _ = controller.evaluate(TINY_VALID, mask_fn=tiny_mask)
    torch.testing.assert_close(log_probs, expected.float(), atol=1e-5, rtol=1e-5)
    # The masked policy is a distribution over exactly the valid sequences.
    assert math.isclose(sum(math.exp(x) for x in hand), 1.0, rel_tol=1e-9)
    # sample() reports the same log-probabilities for the sequences it draws.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        actions, sampled_lp, _ = controller.sample(64, generator=g, mask_fn=tiny_mask)
    lookup = dict(zip(TINY_VALID, expected.tolist()))
    for row, lp in zip(actions.tolist(), sampled_lp.tolist()):
        assert math.isclose(lp, lookup[tuple(row)], abs_tol=1e-5)


def test_entropy_matches_hand_computation():
    controller = _scrambled(Controller(TINY, hidden_size=6))
    # Entropy of step 0 plus entropy of step 1 given the taken first action, by enumeration.
    probs = {a: math.exp(hand_log_prob(controller, a, tiny_mask)) for a in TINY_VALID}
    p0 = {a0: sum(p for a, p in probs.items() if a[0] == a0) for a0 in (0, 1)}
    for a0 in (0, 1):
        step1 = [probs[a] / p0[a0] for a in TINY_VALID if a[0] == a0]
        expected = -sum(p * math.log(p) for p in p0.values()) - sum(p * math.log(p) for p in step1)
        for a in TINY_VALID:
            if a[0] == a0:
                with torch.no_grad():
                    _, entropy = controller.evaluate([a], mask_fn=tiny_mask)
                assert math.isclose(float(entropy[0]), expected, rel_tol=1e-5)


def test_sampling_respects_mask_and_matches_probabilities():
    controller = _scrambled(Controller(TINY, hidden_size=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        actions, _, _ = controller.sample(4000, generator=g, mask_fn=tiny_mask)
    rows = [tuple(r) for r in actions.tolist()]
    assert (0, 1) not in rows
    expected = {a: math.exp(hand_log_prob(controller, a, tiny_mask)) for a in TINY_VALID}
    for a, p in expected.items():
        freq = rows.count(a) / len(rows)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / len(rows)) + 1e-3, (a, freq, p)


def test_single_allowed_choice_is_forced_with_zero_cost():
    def forced(prefix):
        return (False, True) if len(prefix) == 0 else (True, True, True)

    controller = _scrambled(Controller(TINY, hidden_size=4))
    with torch.no_grad():
        actions, log_probs, entropies = controller.sample(50, generator=torch.Generator().manual_seed(0),
                                                          mask_fn=forced)
    assert actions[:, 0].eq(1).all()
    for row, lp, ent in zip(actions.tolist(), log_probs.tolist(), entropies.tolist()):
        # The forced step contributes log 1 = 0 and no entropy; the rest is step 1 given a0 = 1.
        assert math.isclose(lp, hand_log_prob(controller, tuple(row), forced), abs_tol=1e-5)
        step1 = [math.exp(hand_log_prob(controller, (1, j), forced)) for j in range(3)]
        assert math.isclose(sum(step1), 1.0, rel_tol=1e-9)
        assert math.isclose(ent, -sum(p * math.log(p) for p in step1), rel_tol=1e-5)


def test_evaluate_reproduces_sample_and_gradients_are_finite():
    controller = Controller([("a", 3), ("b", 4), ("c", 5), ("d", 2)], hidden_size=16)

    def mask(prefix):
        n = (3, 4, 5, 2)[len(prefix)]
        return tuple((i + sum(prefix)) % 3 != 0 or i == n - 1 for i in range(n))

    actions, log_probs, entropies = controller.sample(32, generator=torch.Generator().manual_seed(5), mask_fn=mask)
    again, ent_again = controller.evaluate(actions, mask_fn=mask)
    torch.testing.assert_close(again, log_probs)
    torch.testing.assert_close(ent_again, entropies)
    masks = controller.compute_masks(actions, mask)
    torch.testing.assert_close(controller.evaluate(actions, masks=masks)[0], log_probs)
    (again.sum() + ent_again.sum()).backward()
    for name, p in controller.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_evaluate_rejects_masked_or_out_of_range_actions():
    controller = Controller(TINY, hidden_size=4)
    with pytest.raises(ValueError, match="not allowed"):
        controller.evaluate([(0, 1)], mask_fn=tiny_mask)
    with pytest.raises(ValueError, match="out of range"):
        controller.evaluate([(0, 3)], mask_fn=tiny_mask)
    with pytest.raises(ValueError, match="allows no choice"):
        controller.sample(2, mask_fn=lambda p: (False, False))
    with pytest.raises(ValueError, match="shape"):
        controller.sample(2, mask_fn=lambda p: (True,))


def test_same_generator_seed_same_samples():
    controller = Controller(TINY, hidden_size=4)
    a, _, _ = controller.sample(20, generator=torch.Generator().manual_seed(7), mask_fn=tiny_mask)
    b, _, _ = controller.sample(20, generator=torch.Generator().manual_seed(7), mask_fn=tiny_mask)
    assert torch.equal(a, b)


def test_greedy_picks_the_most_likely_allowed_choice_each_step():
    controller = _scrambled(Controller(TINY, hidden_size=4))
    actions, _, _ = controller.sample(1, mask_fn=tiny_mask, greedy=True)
    a0 = int(actions[0, 0])
    probs = {a: math.exp(hand_log_prob(controller, a, tiny_mask)) for a in TINY_VALID}
    first = max((0, 1), key=lambda x: sum(p for a, p in probs.items() if a[0] == x))
    assert a0 == first
    assert tuple(actions[0].tolist()) == max((a for a in TINY_VALID if a[0] == a0), key=probs.get)


def test_actions_condition_later_decisions():
    """With embeddings fed back, the second step's distribution depends on the first action."""
    controller = _scrambled(Controller(TINY, hidden_size=6))
    everything = lambda p: (True, True) if not p else (True, True, True)  # noqa: E731
    lp = {a: math.exp(hand_log_prob(controller, a, everything)) for a in itertools.product((0, 1), (0, 1, 2))}
    cond0 = [lp[(0, j)] / sum(lp[(0, k)] for k in range(3)) for j in range(3)]
    cond1 = [lp[(1, j)] / sum(lp[(1, k)] for k in range(3)) for j in range(3)]
    assert max(abs(x - y) for x, y in zip(cond0, cond1)) > 1e-3


# ---------------------------------------------------------------- the real search space

@pytest.mark.parametrize("head", ["sequential", "cell"])
def test_real_space_samples_always_decode(head):
    space_module = pytest.importorskip("nasfcos.space.search_space")
    space = space_module.SearchSpace(head=head)
    controller = Controller(space, generator=torch.Generator().manual_seed(0))
    assert controller.num_choices == tuple(d.num_choices for d in space.decisions)
    with torch.no_grad():
        actions, log_probs, _ = controller.sample(500, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(log_probs).all()
    keys = set()
    for i, row in enumerate(actions.tolist()):
        genotype = space.decode(tuple(row))
        genotype.validate()
        keys.add(genotype.key())
        if i < 100:  # every action was allowed given its prefix (replaying prefixes is O(D^2): a subset)
            for t, a in enumerate(row):
                assert space.valid_choices(tuple(row[:t]))[a]
    assert len(keys) > 400  # a fresh controller explores
    with torch.no_grad():
        again, _ = controller.evaluate(actions)
    torch.testing.assert_close(again, log_probs)
    # The incremental cursors give the same masks as replaying prefixes through valid_choices.
    some = actions[:20]
    by_cursor = controller.compute_masks(some)
    by_prefix = controller.compute_masks(some, mask_fn=space.valid_choices)
    assert all(torch.equal(a, b) for a, b in zip(by_cursor, by_prefix))
    with torch.no_grad():
        torch.testing.assert_close(controller.evaluate(some, mask_fn=space.valid_choices)[0], log_probs[:20])


# ---------------------------------------------------------------- the entropy yardstick


def test_uniform_entropy_is_the_sum_of_log_allowed_choices():
    controller = Controller(TINY, hidden_size=8)
    actions = [(0, 2), (1, 1), (0, 0)]
    masks = controller.compute_masks(actions, mask_fn=tiny_mask)
    expected = [math.log(2) + math.log(2), math.log(2) + math.log(3), math.log(2) + math.log(2)]
    assert controller.uniform_entropy(masks, 3).tolist() == pytest.approx(expected, rel=1e-12)
    # Without a mask every choice counts.
    assert controller.uniform_entropy([None, None], 2).tolist() == pytest.approx([math.log(6)] * 2, rel=1e-12)
    with pytest.raises(ValueError, match="entries"):
        controller.uniform_entropy(masks[:1], 3)


def test_a_fresh_controller_is_close_to_the_masked_uniform_entropy():
    """Small initial weights: the entropy diagnostic starts at ~100 % of its maximum (what the panel shows)."""
    space = pytest.importorskip("nasfcos.space.search_space").SearchSpace()
    controller = Controller(space, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        actions, _, entropies = controller.sample(64, generator=torch.Generator().manual_seed(1))
    maximum = controller.uniform_entropy(controller.compute_masks(actions), 64)
    assert bool((entropies.double() <= maximum + 1e-4).all())
    assert float(entropies.mean()) / float(maximum.mean()) > 0.99
