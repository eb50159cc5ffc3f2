"""SearchSpace: decision order, masks (no dead ends, exact), decode/encode, sampling, exact size."""

from __future__ import annotations

import itertools
import math
import random
from functools import lru_cache

import pytest

from nasfcos.errors import UserError
from nasfcos.space import (
    AGGREGATIONS,
    CELL_HEAD_OPS,
    FPN_OPS,
    HEAD_OPS,
    CellHead,
    Decision,
    FPNCell,
    Genotype,
    HeadCell,
    PlainFPN,
    SearchSpace,
    SequentialHead,
)

SHARE0 = (0, 0, 0, 0, 0)
FIXED_HEAD = SequentialHead(("conv3x3",), SHARE0)


def fpn_only(n: int) -> SearchSpace:
    """Only FPN connections vary: one op, one aggregation, a fixed head."""
    return SearchSpace(num_fpn_cells=n, fpn_ops=("skip",), aggregations=("sum",), fixed_head=FIXED_HEAD)


# ------------------------------------------------------------------------------------------------------------
# Independent truth: brute-force validity and counts written without the package's logic
# ------------------------------------------------------------------------------------------------------------


def unconsumed_count(pairs: list[tuple[int, int]]) -> int:
    read = {i for pair in pairs for i in pair}
    return sum(1 for t in range(len(pairs)) if 4 + t not in read)


def brute_force_connection_count(n: int) -> int:
    """Enumerate every (in1, in2) sequence of n cells and count those leaving >= 3 unread cell outputs."""
    cell_bits = sum(1 << (4 + t) for t in range(n))

    def walk(t: int, read: int) -> int:  # read: bit i set when pool entry i has been read
        if t == n:
            return 1 if bin(cell_bits & ~read).count("1") >= 3 else 0
        return sum(walk(t + 1, read | (1 << a) | (1 << b)) for a in range(4 + t) for b in range(4 + t))

    return walk(0, 0)


def explicit_state_count(n: int) -> int:
    """Exact count by DP over the *set* of unconsumed outputs, enumerating every pair explicitly."""

    @lru_cache(maxsize=None)
    def count(t: int, unconsumed: frozenset[int]) -> int:
        if t == n:
            return 1 if len(unconsumed) >= 3 else 0
        total = 0
        for in1 in range(4 + t):
            for in2 in range(4 + t):
                total += count(t + 1, (unconsumed - {in1, in2}) | {4 + t})
        return total

    return count(0, frozenset())


# ------------------------------------------------------------------------------------------------------------
# Decisions
# ------------------------------------------------------------------------------------------------------------


def test_default_sequential_decisions_in_documented_order() -> None:
    space = SearchSpace()
    d = space.decisions
    assert len(d) == 7 * 5 + 6 + 1
    assert d[:5] == (
        Decision("fpn[0].in1", 4, "fpn_in", ("C2", "C3", "C4", "C5")),
        Decision("fpn[0].in2", 4, "fpn_in", ("C2", "C3", "C4", "C5")),
        Decision("fpn[0].op1", 5, "fpn_op", FPN_OPS),
        Decision("fpn[0].op2", 5, "fpn_op", FPN_OPS),
        Decision("fpn[0].agg", 2, "fpn_agg", AGGREGATIONS),
    )
    for t in range(7):
        assert d[5 * t].name == f"fpn[{t}].in1" and d[5 * t].num_choices == 4 + t
        assert d[5 * t + 1].name == f"fpn[{t}].in2" and d[5 * t + 1].num_choices == 4 + t
    assert d[30].labels == ("C2", "C3", "C4", "C5", "F4", "F5", "F6", "F7", "F8", "F9")
    assert [x.name for x in d[35:41]] == [f"head.ops[{i}]" for i in range(6)]
    assert all(x.num_choices == 6 and x.labels == HEAD_OPS for x in d[35:41])
    assert d[41] == Decision("head.share_from", 7, "share", tuple("0123456"))
    assert space.per_level_share is False


def test_default_cell_head_decisions_in_documented_order() -> None:
    space = SearchSpace(head="cell")
    d = space.decisions
    assert len(d) == 35 + 1 + 5 * 5 + 5
    assert d[35] == Decision("head.op0", 5, "head_op", CELL_HEAD_OPS)
    for t in range(5):
        base = 36 + 5 * t
        assert [x.name for x in d[base : base + 5]] == [
            f"head.cells[{t}].{f}" for f in ("in1", "in2", "op1", "op2", "agg")
        ]
        assert d[base].num_choices == d[base + 1].num_choices == 2 + 3 * t
        assert d[base + 2].num_choices == 5 and d[base + 4].num_choices == 2
    assert d[36].labels == ("h0", "h1")
    assert [x.name for x in d[61:]] == [f"head.share_from[{l}]" for l in range(5)]
    assert all(x.num_choices == 7 for x in d[61:])  # op0 + 5 cells = 6 layers -> 0..6
    assert space.per_level_share is True


def test_share_mode_and_counts_are_configurable() -> None:
    seq = SearchSpace(num_fpn_cells=4, num_head_layers=3, per_level_share=True)
    assert [x.name for x in seq.decisions[-5:]] == [f"head.share_from[{l}]" for l in range(5)]
    assert seq.decisions[-1].num_choices == 4
    cell = SearchSpace(head="cell", num_head_cells=2, per_level_share=False)
    assert cell.decisions[-1] == Decision("head.share_from", 4, "share", ("0", "1", "2", "3"))
    assert len(cell.decisions) == 7 * 5 + 1 + 2 * 5 + 1


# ------------------------------------------------------------------------------------------------------------
# Sampling, decode, encode
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["sequential", "cell"])
def test_thousand_samples_are_valid_and_round_trip(head: str) -> None:
    space = SearchSpace(head=head)
    rng = random.Random(2020)
    seen = set()
    for _ in range(1000):
        actions = space.sample_actions(rng)
        g = space.decode(actions)
        g.validate()
        assert len(g.fpn_outputs().dangling) == len(g.fpn) - 3 - sum(
            1 for t in range(len(g.fpn)) if any(4 + t in (c.in1, c.in2) for c in g.fpn)
        )
        assert space.encode(g) == actions
        assert space.decode(space.encode(g)) == g
        seen.add(actions)
    assert len(seen) > 990  # the space is huge: repeats would mean a broken sampler


def test_same_seed_same_samples() -> None:
    for head in ("sequential", "cell"):
        space = SearchSpace(head=head)
        first = [space.sample(random.Random(5)) for _ in range(3)]
        rng_a, rng_b = random.Random(9), random.Random(9)
        assert [space.sample(rng_a) for _ in range(20)] == [space.sample(rng_b) for _ in range(20)]
        assert first[0] == first[1] == first[2] == space.sample(5)
        assert space.sample(random.Random(6)) != first[0]


def test_released_genotype_encodes_to_its_own_integers() -> None:
    g = Genotype.from_released(
        [[3, 3, 4, 4, 1], [3, 3, 4, 4, 1], [4, 3, 4, 3, 1], [1, 3, 4, 3, 1], [5, 3, 4, 4, 1], [4, 7, 4, 4, 1],
         [7, 2, 4, 4, 1], 0, [5, 1, 5, 0, 4, 4]]
    )
    actions = SearchSpace().encode(g)
    # Default tables are the released integer order, so the actions are the released list flattened.
    assert actions == (3, 3, 4, 4, 1, 3, 3, 4, 4, 1, 4, 3, 4, 3, 1, 1, 3, 4, 3, 1, 5, 3, 4, 4, 1, 4, 7, 4, 4, 1,
                       7, 2, 4, 4, 1, 5, 1, 5, 0, 4, 4, 0)
    assert SearchSpace().decode(actions) == g


def test_op_subsets_index_the_space_tables() -> None:
    space = SearchSpace(num_fpn_cells=3, fpn_ops=("skip", "dcn3x3"), aggregations=("concat",), head_ops=("dcn3x3", "conv3x3"), num_head_layers=2)
    g = Genotype((FPNCell(3, 2, "dcn3x3", "skip", "concat"),) * 3, SequentialHead(("conv3x3", "dcn3x3"), (1,) * 5))
    actions = space.encode(g)
    assert actions == (3, 2, 1, 0, 0) * 3 + (1, 0, 1)
    assert space.decode(actions) == g
    assert space.size() == 4096 * (2 * 2 * 1) ** 3 * 2**2 * 3


def test_decode_errors_name_the_decision_and_value() -> None:
    space = SearchSpace()
    good = list(space.sample_actions(random.Random(1)))
    with pytest.raises(UserError, match=r"^actions: expected 42 choices, one per decision \(got 41\)"):
        space.decode(good[:-1])
    with pytest.raises(UserError, match=r"^actions: 43 choices; this search space has 42 decisions"):
        space.decode(good + [0])
    bad = list(good)
    bad[3] = 5
    with pytest.raises(UserError, match=r"^actions\[3\] \(fpn\[0\]\.op2\): choice 5 out of range 0\.\.4$"):
        space.decode(bad)
    bad = list(good)
    bad[41] = -1
    with pytest.raises(UserError, match=r"^actions\[41\] \(head\.share_from\): choice -1 out of range 0\.\.6"):
        space.decode(bad)
    bad = list(good)
    bad[10] = "2"
    with pytest.raises(UserError, match=r"^actions\[10\] \(fpn\[2\]\.in1\): expected an integer choice \(got '2'\)"):
        space.decode(bad)
    with pytest.raises(UserError, match=r"^actions: expected a sequence"):
        space.decode("0123")


def test_decode_rejects_a_dead_end_at_the_decision_that_causes_it() -> None:
    space = fpn_only(3)
    # With 3 cells every output must stay unread; cell 1 reading F4 (choice 4) is the fatal decision.
    actions = [3, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(
        UserError,
        match=r"^actions\[5\] \(fpn\[1\]\.in1\): choice 4 \(F4\) is not allowed here: it leaves at most 2 unconsumed",
    ):
        space.decode(actions)


def test_decode_accepts_integer_like_values() -> None:
    class IntLike:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    space = SearchSpace()
    actions = space.sample_actions(random.Random(4))
    assert space.decode([IntLike(a) for a in actions]) == space.decode(actions)
    with pytest.raises(UserError, match="expected an integer choice"):
        space.decode([True] + list(actions[1:]))


def test_encode_rejects_genotypes_outside_the_space() -> None:
    space = SearchSpace()
    g = space.sample(random.Random(0))
    plain_head = SequentialHead(("conv3x3",) * 4, SHARE0)
    cases = [
        (Genotype(PlainFPN(), g.head), r"^genotype\.fpn: a PlainFPN is not in this search space"),
        (Genotype(g.fpn[:6], g.head), r"^genotype\.fpn: has 6 cells; this search space has 7"),
        (Genotype(g.fpn, plain_head), r"^genotype\.head\.ops: has 4 layers; this search space has 6"),
        (
            Genotype(g.fpn, SequentialHead(g.head.ops, (0, 1, 0, 0, 0))),
            r"^genotype\.head\.share_from: differs across levels",
        ),
        (
            Genotype(g.fpn, CellHead("skip", (HeadCell(0, 1, "skip", "skip", "sum"),), SHARE0)),
            r"^genotype\.head: expected a SequentialHead in this search space \(got CellHead\)",
        ),
    ]
    for genotype, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            space.encode(genotype)
        assert not space.contains(genotype)
    subset = SearchSpace(fpn_ops=("skip", "sep3x3"))
    g2 = Genotype(tuple(FPNCell(3, 3, "dcn3x3", "skip", "sum") for _ in range(7)), g.head)
    with pytest.raises(UserError, match=r"^genotype\.fpn\[0\]\.op1: 'dcn3x3' is not among this search space's FPN ops"):
        subset.encode(g2)
    with pytest.raises(UserError, match=r"only 2 unconsumed"):  # an invalid genotype is reported by validate
        space.encode(Genotype((FPNCell(3, 3, "skip", "skip", "sum"),) * 2, g.head))
    cell_space = SearchSpace(head="cell")
    with pytest.raises(UserError, match=r"^genotype\.head: expected a CellHead"):
        cell_space.encode(g)
    assert space.contains(g)


def test_fixed_parts_remove_their_decisions() -> None:
    released = Genotype.from_released(
        [[3, 3, 4, 4, 1], [3, 3, 4, 4, 1], [4, 3, 4, 3, 1], [1, 3, 4, 3, 1], [5, 3, 4, 4, 1], [4, 7, 4, 4, 1],
         [7, 2, 4, 4, 1], 0, [5, 1, 5, 0, 4, 4]]
    )
    head_only = SearchSpace(fixed_fpn=released.fpn, head="cell")
    assert head_only.decisions[0].name == "head.op0"
    assert head_only.size() == SearchSpace(head="cell").size() // SearchSpace(fixed_head=FIXED_HEAD).size()
    g = head_only.sample(random.Random(0))
    assert g.fpn == released.fpn and isinstance(g.head, CellHead)
    assert head_only.decode(head_only.encode(g)) == g
    with pytest.raises(UserError, match=r"^genotype\.fpn: differs from this search space's fixed FPN"):
        head_only.encode(Genotype(PlainFPN(), g.head))
    fpn_search = SearchSpace(fixed_head=released.head)
    assert len(fpn_search.decisions) == 35 and fpn_search.decisions[-1].name == "fpn[6].agg"
    assert fpn_search.decode(fpn_search.encode(released)) == released
    with pytest.raises(UserError, match=r"^genotype\.head: differs from this search space's fixed head"):
        fpn_search.encode(Genotype(released.fpn, FIXED_HEAD))
    plain = SearchSpace(fixed_fpn=PlainFPN("dcn3x3"))
    assert plain.decisions[0].name == "head.ops[0]" and plain.sample(1).fpn == PlainFPN("dcn3x3")
    assert plain.size() == 6**6 * 7


def test_invalid_configurations_are_user_errors() -> None:
    cases = [
        (dict(num_fpn_cells=2), r"num_fpn_cells must be an integer >= 3"),
        (dict(head="tower"), r"head: unknown head kind \(got 'tower'\); expected one of sequential, cell"),
        (dict(fpn_ops=("conv3x3",)), r"fpn_ops: unknown name \(got 'conv3x3'\)"),
        (dict(fpn_ops=()), r"fpn_ops must be a non-empty list"),
        (dict(fpn_ops="skip"), r"fpn_ops must be a non-empty list"),
        (dict(aggregations=("sum", "sum")), r"aggregations: duplicate names"),
        (dict(head_ops=("sep5x5_d6",)), r"head_ops: unknown name \(got 'sep5x5_d6'\); expected one of conv1x1"),
        (dict(head="cell", head_ops=("conv1x1",)), r"head_ops: unknown name \(got 'conv1x1'\); expected one of sep3x3"),
        (dict(num_head_layers=0), r"num_head_layers must be an integer >= 1"),
        (dict(fixed_fpn=(FPNCell(3, 3, "skip", "skip", "sum"),)), r"fixed_fpn: only 1 unconsumed"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(UserError, match=r"^search space: .*" + pattern):
            SearchSpace(**kwargs)


def test_to_dict_round_trip() -> None:
    for space in (
        SearchSpace(),
        SearchSpace(head="cell", num_head_cells=3, per_level_share=False, fpn_ops=("skip", "dcn3x3")),
        SearchSpace(fixed_fpn=PlainFPN("dcn3x3")),
        SearchSpace(fixed_head=FIXED_HEAD, num_fpn_cells=5),
    ):
        again = SearchSpace.from_dict(space.to_dict())
        assert again == space and again.decisions == space.decisions and again.size() == space.size()
    with pytest.raises(UserError, match=r"^search space: unknown key 'cells'"):
        SearchSpace.from_dict({"cells": 7})


# ------------------------------------------------------------------------------------------------------------
# Masks: never a dead end, and exactly the valid genotypes
# ------------------------------------------------------------------------------------------------------------


def test_masks_exhaustive_on_a_tiny_space() -> None:
    space = SearchSpace(num_fpn_cells=3, fpn_ops=("skip",), aggregations=("sum",), head_ops=("conv3x3",), num_head_layers=1)
    leaves: set[tuple[int, ...]] = set()

    def walk(cursor) -> None:
        if cursor.done:
            leaves.add(tuple(cursor.actions))
            return
        mask = cursor.mask()
        assert len(mask) == space.decisions[len(cursor.actions)].num_choices
        assert any(mask), f"dead end after {cursor.actions}"
        for choice, allowed in enumerate(mask):
            if allowed:
                nxt = cursor.copy()
                nxt.push(choice)
                walk(nxt)

    walk(space.start())
    # Brute force over the whole product: an action sequence is valid iff its FPN keeps >= 3 unread outputs.
    valid = {
        actions
        for actions in itertools.product(*(range(d.num_choices) for d in space.decisions))
        if unconsumed_count([(actions[5 * t], actions[5 * t + 1]) for t in range(3)]) >= 3
    }
    assert leaves == valid
    assert len(valid) == space.size() == 4096 * 2  # 16 backbone pairs per cell, cubed; 2 share choices
    for actions in sorted(valid)[::97]:
        assert space.decode(actions).fpn_outputs().p3 == 6


def _tight_prefix(space: SearchSpace, rng: random.Random, stop: int) -> list[int]:
    """Follow the masks for ``stop`` decisions, preferring to consume cell outputs so that masks get tight."""
    cursor = space.start()
    for _ in range(stop):
        allowed = [i for i, ok in enumerate(cursor.mask()) if ok]
        decision = space.decisions[len(cursor.actions)]
        if decision.kind == "fpn_in" and rng.random() < 0.8:
            cursor.push(max(allowed))
        else:
            cursor.push(rng.choice(allowed))
    return cursor.actions


def completable(n: int, pairs: list[tuple[int, int]], in1: int | None) -> bool:
    """Brute force: does some choice of the remaining connections leave >= 3 unread outputs?"""
    t = len(pairs)
    firsts = [in1] if in1 is not None else list(range(4 + t))
    rest = [list(itertools.product(range(4 + u), repeat=2)) for u in range(t + 1, n)]
    for first in firsts:
        for second in range(4 + t):
            for tail in itertools.product(*rest):
                if unconsumed_count(pairs + [(first, second)] + list(tail)) >= 3:
                    return True
    return False


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_masks_equal_brute_force_completability(n: int) -> None:
    space = fpn_only(n)
    rng = random.Random(n)
    checked_false = 0
    for trial in range(60):
        t = rng.randrange(max(1, n - 3), n)  # the last cells, where the constraint binds
        field = rng.randrange(2)
        prefix = _tight_prefix(space, rng, 5 * t + field)
        pairs = [(prefix[5 * u], prefix[5 * u + 1]) for u in range(t)]
        mask = space.valid_choices(prefix)
        for choice, allowed in enumerate(mask):
            if field == 0:
                truth = completable(n, pairs, choice)
            else:
                truth = any(
                    unconsumed_count(pairs + [(prefix[-1], choice)] + list(tail)) >= 3
                    for tail in itertools.product(*[list(itertools.product(range(4 + u), repeat=2)) for u in range(t + 1, n)])
                )
            assert allowed == truth, (prefix, choice)
            checked_false += not allowed
    assert checked_false > 0  # the tight prefixes did exercise forbidden choices


def test_valid_choices_matches_an_incremental_cursor_and_rejects_full_prefixes() -> None:
    space = SearchSpace(head="cell")
    actions = space.sample_actions(random.Random(8))
    cursor = space.start()
    for i, action in enumerate(actions):
        assert space.valid_choices(actions[:i]) == cursor.mask()
        cursor.push(action)
    with pytest.raises(UserError, match="leaves no next decision"):
        space.valid_choices(actions)
    with pytest.raises(UserError, match="already taken"):
        cursor.mask()


# ------------------------------------------------------------------------------------------------------------
# size()
# ------------------------------------------------------------------------------------------------------------


def test_size_matches_hand_counts() -> None:
    # n = 3: no cell may read a cell output: 16 pairs per cell -> 16**3.
    assert fpn_only(3).size() == 16**3 == 4096
    # n = 4: at most one of F4, F5, F6 is read (F7 is never readable).
    #   none read: 16**4 = 65536; only F4: 16 * (25**3 - 16**3) = 184464;
    #   only F5: 16 * 16 * (25**2 - 16**2) = 94464; only F6: 16 * 16 * 16 * (25 - 16) = 36864.
    assert fpn_only(4).size() == 65536 + 184464 + 94464 + 36864 == 381328


@pytest.mark.parametrize("n", [3, 4])
def test_size_equals_brute_force_enumeration(n: int) -> None:
    assert fpn_only(n).size() == brute_force_connection_count(n)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_size_equals_explicit_state_dp(n: int) -> None:
    assert fpn_only(n).size() == explicit_state_count(n)


def test_size_of_full_spaces_multiplies_independent_parts() -> None:
    fpn7 = explicit_state_count(7)
    assert SearchSpace().size() == fpn7 * (5 * 5 * 2) ** 7 * 6**6 * 7
    per_level = SearchSpace(per_level_share=True).size()
    assert per_level == fpn7 * (5 * 5 * 2) ** 7 * 6**6 * 7**5
    cell_head = 5 * math.prod((2 + 3 * t) ** 2 * 5 * 5 * 2 for t in range(5)) * 7**5
    assert SearchSpace(head="cell").size() == fpn7 * (5 * 5 * 2) ** 7 * cell_head


def test_size_of_a_tiny_cell_head_equals_enumeration() -> None:
    fpn = tuple(FPNCell(3, 3, "skip", "skip", "sum") for _ in range(3))
    space = SearchSpace(fixed_fpn=fpn, head="cell", num_head_cells=2, head_ops=("skip",), num_levels=2)
    assert [d.num_choices for d in space.decisions] == [1, 2, 2, 1, 1, 2, 5, 5, 1, 1, 2, 4, 4]
    product = list(itertools.product(*(range(d.num_choices) for d in space.decisions)))
    assert space.size() == len(product) == 1 * (4 * 2) * (25 * 2) * 4**2
    decoded = {space.decode(a) for a in product}
    assert len(decoded) == len(product)  # decode is injective
    assert all(space.encode(g) in set(product) for g in list(decoded)[:50])
