"""Genotype: the released literal, the FPN output rule, validation messages, JSON, released format, key()."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from nasfcos.errors import UserError
from nasfcos.space import (
    CellHead,
    FPNCell,
    FPNOutputs,
    Genotype,
    HeadCell,
    PlainFPN,
    SearchSpace,
    SequentialHead,
    fpn_outputs,
    fpn_pool_strides,
    released_literal,
    unconsumed_outputs,
)

# FACTS 3, typed in by hand (not taken from the package) so that a wrong constant in released.py would fail.
RELEASED = [
    [3, 3, 4, 4, 1],
    [3, 3, 4, 4, 1],
    [4, 3, 4, 3, 1],
    [1, 3, 4, 3, 1],
    [5, 3, 4, 4, 1],
    [4, 7, 4, 4, 1],
    [7, 2, 4, 4, 1],
    0,
    [5, 1, 5, 0, 4, 4],
]
SHARE0 = (0, 0, 0, 0, 0)


def cell(in1: int, in2: int, op1: str = "sep3x3", op2: str = "sep3x3", agg: str = "sum") -> FPNCell:
    return FPNCell(in1, in2, op1, op2, agg)


def seq_head(ops: tuple[str, ...] = ("conv3x3",) * 4, share: tuple[int, ...] = SHARE0) -> SequentialHead:
    return SequentialHead(ops, share)


def backbone_only(n: int) -> tuple[FPNCell, ...]:
    """n cells that each read C5 twice: nothing is consumed."""
    return tuple(cell(3, 3) for _ in range(n))


# ------------------------------------------------------------------------------------------------------------
# The released architecture (FACTS 3)
# ------------------------------------------------------------------------------------------------------------


def test_released_literal_decodes_to_the_facts_description() -> None:
    g = Genotype.from_released(RELEASED)
    dcn, skip, cat = "dcn3x3", "skip", "concat"
    assert g.fpn == (
        FPNCell(3, 3, dcn, dcn, cat),  # F4 = cat(dcn(C5), dcn(C5))
        FPNCell(3, 3, dcn, dcn, cat),  # F5 = cat(dcn(C5), dcn(C5))
        FPNCell(4, 3, dcn, skip, cat),  # F6 = cat(dcn(F4), C5)
        FPNCell(1, 3, dcn, skip, cat),  # F7 = cat(dcn(C3), C5)
        FPNCell(5, 3, dcn, dcn, cat),  # F8 = cat(dcn(F5), dcn(C5))
        FPNCell(4, 7, dcn, dcn, cat),  # F9 = cat(dcn(F4), dcn(F7))
        FPNCell(7, 2, dcn, dcn, cat),  # F10 = cat(dcn(F7), dcn(C4))
    )
    assert g.head == SequentialHead(("dcn3x3", "conv3x3", "dcn3x3", "conv1x1", "skip", "skip"), SHARE0)
    # Hand check of the output rule: cells read 3,3 | 3,3 | 4,3 | 1,3 | 5,3 | 4,7 | 7,2, so among the cell
    # outputs 4..10 only 4, 5 and 7 are read; unconsumed = 6, 8, 9, 10 -> P5 = 8, P4 = 9, P3 = 10, dangling 6.
    assert g.fpn_outputs() == FPNOutputs(p5=8, p4=9, p3=10, dangling=(6,))
    # Strides stated in FACTS 3: F7, F9, F10 at stride 8; the rest at 32.
    assert fpn_pool_strides(g.fpn)[4:] == (32, 32, 32, 8, 32, 8, 8)


def test_released_literal_round_trips() -> None:
    g = Genotype.from_released(RELEASED)
    assert g.to_released() == RELEASED
    assert released_literal() == RELEASED
    assert Genotype.from_released(g.to_released()) == g
    assert Genotype.from_json(json.dumps(RELEASED)) == g  # a JSON list is read as the released format


def test_describe_draws_the_released_cells() -> None:
    text = Genotype.from_released(RELEASED).describe()
    lines = [line.strip() for line in text.splitlines()]
    assert "F4 = concat(dcn3x3(C5), dcn3x3(C5))  [stride 32]" in lines
    assert "F6 = concat(dcn3x3(F4), C5)  [stride 32]" in lines
    assert "F10 = concat(dcn3x3(F7), dcn3x3(C4))  [stride 8]" in lines
    assert "P5 = F8 + F6  [resized to stride 32]" in lines
    assert "P4 = F9 + F6  [resized to stride 16]" in lines
    assert "P3 = F10 + F6  [resized to stride 8]" in lines
    assert "dcn3x3 -> conv3x3 -> dcn3x3 -> conv1x1 -> skip -> skip" in lines
    assert str(Genotype.from_released(RELEASED)) == text


# ------------------------------------------------------------------------------------------------------------
# The output rule on hand-made FPNs
# ------------------------------------------------------------------------------------------------------------


def test_output_rule_three_backbone_cells_no_dangling() -> None:
    assert fpn_outputs(backbone_only(3)) == FPNOutputs(p5=4, p4=5, p3=6, dangling=())


def test_output_rule_extra_unread_cells_are_dangling() -> None:
    # Five cells, none read by another: 4..8 unconsumed; newest three are P5, P4, P3; 4 and 5 dangle.
    assert fpn_outputs(backbone_only(5)) == FPNOutputs(p5=6, p4=7, p3=8, dangling=(4, 5))


def test_output_rule_skips_consumed_outputs() -> None:
    # Cell 2 reads F4, cell 4 reads F6 -> unconsumed 5, 7, 8 (F5 is older than F7 and becomes P5).
    cells = (cell(0, 1), cell(2, 3), cell(4, 0), cell(1, 1), cell(6, 6))
    assert unconsumed_outputs(cells) == (5, 7, 8)
    assert fpn_outputs(cells) == FPNOutputs(p5=5, p4=7, p3=8, dangling=())


def test_output_rule_rejects_fewer_than_three_unconsumed() -> None:
    # Cell 1 reads F4, cell 2 reads F5: only F6 and F7 stay unread.
    cells = (cell(0, 1), cell(4, 4), cell(5, 0), cell(2, 3))
    assert unconsumed_outputs(cells) == (6, 7)
    with pytest.raises(UserError, match=r"genotype\.fpn: only 2 unconsumed cell output\(s\) \(F6, F7\)"):
        Genotype(cells, seq_head()).validate()
    with pytest.raises(UserError):
        fpn_outputs(cells)


def test_backbone_features_never_count_as_unconsumed() -> None:
    # Nobody reads C2 (index 0), yet only cell outputs count: 2 cells are too few.
    assert unconsumed_outputs((cell(3, 3), cell(3, 3))) == (4, 5)
    with pytest.raises(UserError, match="only 2 unconsumed"):
        Genotype((cell(3, 3), cell(3, 3)), seq_head()).validate()


def test_fpn_outputs_on_plain_fpn_is_a_bug_not_a_user_error() -> None:
    with pytest.raises(TypeError):
        Genotype(PlainFPN(), seq_head()).fpn_outputs()


# ------------------------------------------------------------------------------------------------------------
# Validation: every kind of mistake names its field
# ------------------------------------------------------------------------------------------------------------

GOOD_CELL_HEAD = CellHead("sep3x3", (HeadCell(1, 0, "sep3x3", "skip", "sum"), HeadCell(4, 2, "dcn3x3", "sep3x3", "concat")), (0, 1, 2, 3, 3))


def fpn_with(t: int, **changes: object) -> tuple[FPNCell, ...]:
    cells = list(backbone_only(7))
    cells[t] = replace(cells[t], **changes)
    return tuple(cells)


@pytest.mark.parametrize(
    ("genotype", "pattern"),
    [
        (
            Genotype(fpn_with(3, in2=9), seq_head()),
            r"^genotype\.fpn\[3\]\.in2: index 9 out of range 0\.\.6 \(pool has 7 entries at cell 3\)$",
        ),
        (Genotype(fpn_with(0, in1=-1), seq_head()), r"genotype\.fpn\[0\]\.in1: index -1 out of range 0\.\.3"),
        (Genotype(fpn_with(2, in1="3"), seq_head()), r"genotype\.fpn\[2\]\.in1: expected an integer .*'3'"),
        (Genotype(fpn_with(2, in1=True), seq_head()), r"genotype\.fpn\[2\]\.in1: expected an integer"),
        (
            Genotype(fpn_with(1, op1="conv3x3"), seq_head()),
            r"genotype\.fpn\[1\]\.op1: unknown FPN op \(got 'conv3x3'\); expected one of sep3x3, sep3x3_d3, "
            r"sep5x5_d6, skip, dcn3x3",
        ),
        (Genotype(fpn_with(6, op2=4), seq_head()), r"genotype\.fpn\[6\]\.op2: unknown FPN op \(got 4\)"),
        (Genotype(fpn_with(5, agg="mean"), seq_head()), r"genotype\.fpn\[5\]\.agg: unknown aggregation .*sum, concat"),
        (Genotype((), seq_head()), r"genotype\.fpn: no cells"),
        (Genotype("fpn", seq_head()), r"genotype\.fpn: expected a tuple of FPNCell or a PlainFPN"),
        (
            Genotype((HeadCell(3, 3, "skip", "skip", "sum"),) * 3, seq_head()),
            r"genotype\.fpn\[0\]: expected a cell of type FPNCell \(got HeadCell\)",
        ),
        (Genotype(PlainFPN("sep3x3"), seq_head()), r"genotype\.fpn\.conv: unknown plain FPN conv .*conv3x3, dcn3x3"),
        (Genotype(backbone_only(3), seq_head(("conv3x3", "sep5x5_d6"))), r"genotype\.head\.ops\[1\]: unknown head op"),
        (Genotype(backbone_only(3), seq_head(())), r"genotype\.head\.ops: expected a non-empty list"),
        (
            Genotype(backbone_only(3), seq_head(share=(0, 0, 0))),
            r"genotype\.head\.share_from: expected 5 entries, one per pyramid level P3 P4 P5 P6 P7 \(got 3\)",
        ),
        (
            Genotype(backbone_only(3), seq_head(share=(0, 0, 5, 0, 0))),
            r"genotype\.head\.share_from\[2\]: share index 5 out of range 0\.\.4 \(the head has 4 layers\)",
        ),
        (Genotype(backbone_only(3), seq_head(share=(0, 0, 0, 0, None))), r"genotype\.head\.share_from\[4\]: expected an integer"),
        (Genotype(backbone_only(3), seq_head(share=0)), r"genotype\.head\.share_from: expected a list of 5"),
        (Genotype(backbone_only(3), "head"), r"genotype\.head: expected a SequentialHead or a CellHead"),
        (Genotype(backbone_only(3), replace(GOOD_CELL_HEAD, op0="conv1x1")), r"genotype\.head\.op0: unknown cell-head op"),
        (
            Genotype(backbone_only(3), replace(GOOD_CELL_HEAD, cells=(HeadCell(2, 0, "skip", "skip", "sum"),))),
            r"genotype\.head\.cells\[0\]\.in1: index 2 out of range 0\.\.1 \(pool has 2 entries at cell 0\)",
        ),
        (
            Genotype(backbone_only(3), replace(GOOD_CELL_HEAD, cells=(GOOD_CELL_HEAD.cells[0], HeadCell(1, 5, "skip", "skip", "sum")))),
            r"genotype\.head\.cells\[1\]\.in2: index 5 out of range 0\.\.4",
        ),
        (Genotype(backbone_only(3), replace(GOOD_CELL_HEAD, cells=())), r"genotype\.head\.cells: expected a non-empty"),
        (
            Genotype(backbone_only(3), replace(GOOD_CELL_HEAD, share_from=(0, 0, 0, 0, 4))),
            r"genotype\.head\.share_from\[4\]: share index 4 out of range 0\.\.3 \(the head has 3 layers\)",
        ),
    ],
)
def test_validate_names_field_and_value(genotype: Genotype, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern) as info:
        genotype.validate()
    assert "\n" not in str(info.value)


def test_valid_genotypes_pass_and_validate_returns_self() -> None:
    for g in (
        Genotype(backbone_only(3), seq_head()),
        Genotype(PlainFPN("dcn3x3"), seq_head(("dcn3x3",) * 4)),
        Genotype(backbone_only(4), GOOD_CELL_HEAD),
        Genotype(backbone_only(3), seq_head(share=(4, 4, 4, 4, 4))),  # share == num_layers: nothing shared
    ):
        assert g.validate() is g


def test_lists_are_stored_as_tuples_so_genotypes_hash() -> None:
    g = Genotype([cell(3, 3)] * 3, SequentialHead(["conv3x3"], [0] * 5))
    assert g == Genotype(backbone_only(3), SequentialHead(("conv3x3",), SHARE0))
    assert len({g, Genotype(backbone_only(3), SequentialHead(("conv3x3",), SHARE0))}) == 1


def test_cell_head_layers_and_output() -> None:
    assert GOOD_CELL_HEAD.num_layers == 3
    assert GOOD_CELL_HEAD.output_index == 7  # pool: p, o0, (2, 3, 4), (5, 6, 7)
    assert seq_head().num_layers == 4


# ------------------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------------------


def test_json_format_is_the_documented_one() -> None:
    g = Genotype(backbone_only(3), seq_head(("dcn3x3", "skip")))
    assert json.loads(g.to_json()) == {
        "fpn": [{"in1": 3, "in2": 3, "op1": "sep3x3", "op2": "sep3x3", "agg": "sum"}] * 3,
        "head": {"type": "sequential", "ops": ["dcn3x3", "skip"], "share_from": [0, 0, 0, 0, 0]},
    }
    assert Genotype(PlainFPN("dcn3x3"), seq_head()).to_dict()["fpn"] == {"plain": "dcn3x3"}
    head = Genotype(backbone_only(3), GOOD_CELL_HEAD).to_dict()["head"]
    assert head == {
        "type": "cell",
        "op0": "sep3x3",
        "cells": [
            {"in1": 1, "in2": 0, "op1": "sep3x3", "op2": "skip", "agg": "sum"},
            {"in1": 4, "in2": 2, "op1": "dcn3x3", "op2": "sep3x3", "agg": "concat"},
        ],
        "share_from": [0, 1, 2, 3, 3],
    }


@pytest.mark.parametrize("head", ["sequential", "cell"])
def test_json_round_trip_on_samples(head: str) -> None:
    space = SearchSpace(head=head)
    rng = random.Random(7)
    samples = [space.sample(rng) for _ in range(50)]
    samples += [Genotype(PlainFPN("dcn3x3"), seq_head()), Genotype.from_released(RELEASED)]
    for g in samples:
        assert Genotype.from_json(g.to_json()) == g
        assert Genotype.from_json(g.to_json(indent=None)) == g
        assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_share_from_may_be_one_integer_in_json() -> None:
    data = {"fpn": {"plain": "conv3x3"}, "head": {"type": "sequential", "ops": ["conv3x3"], "share_from": 1}}
    assert Genotype.from_dict(data).head.share_from == (1, 1, 1, 1, 1)


def _base() -> dict:
    return Genotype(backbone_only(3), seq_head()).to_dict()


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("head"), r"^genotype: missing key 'head'"),
        (lambda d: d.update(extra=1), r"^genotype: unknown key 'extra'"),
        (lambda d: d["fpn"][1].pop("agg"), r"^genotype\.fpn\[1\]: missing key 'agg'"),
        (lambda d: d["fpn"][1].update(in3=0), r"^genotype\.fpn\[1\]: unknown key 'in3'"),
        (lambda d: d["fpn"].__setitem__(2, [3, 3, 0, 0, 0]), r"^genotype\.fpn\[2\]: expected a JSON object"),
        (lambda d: d["fpn"][0].update(in1="3"), r"^genotype\.fpn\[0\]\.in1: expected an integer"),
        (lambda d: d["fpn"][0].update(in1=3.0), r"^genotype\.fpn\[0\]\.in1: expected an integer"),
        (lambda d: d["fpn"][0].update(op1=None), r"^genotype\.fpn\[0\]\.op1: unknown FPN op \(got None\)"),
        (lambda d: d.update(fpn="plain"), r"^genotype\.fpn: expected a list of FPN cells"),
        (lambda d: d.update(fpn={"plain": "conv3x3", "x": 1}), r"^genotype\.fpn: unknown key 'x'"),
        (lambda d: d["head"].update(type="tower"), r"^genotype\.head\.type: unknown head type \(got 'tower'\)"),
        (lambda d: d["head"].pop("type"), r"^genotype\.head\.type: unknown head type \(got None\)"),
        (lambda d: d["head"].pop("ops"), r"^genotype\.head: missing key 'ops'"),
        (lambda d: d["head"].update(ops="conv3x3"), r"^genotype\.head\.ops: expected a list"),
        (lambda d: d["head"].update(share_from="0"), r"^genotype\.head\.share_from: expected a list"),
        (lambda d: d.update(head=[]), r"^genotype\.head: expected a JSON object"),
    ],
)
def test_from_dict_rejects_malformed_input(mutate, pattern: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(UserError, match=pattern):
        Genotype.from_dict(data)


def test_from_dict_rejects_non_object_and_from_json_rejects_bad_syntax() -> None:
    with pytest.raises(UserError, match=r"^genotype: expected a JSON object"):
        Genotype.from_dict("nas-fcos")
    with pytest.raises(UserError, match=r"^genotype JSON: malformed at line 1"):
        Genotype.from_json("{fpn: ")


def test_from_dict_validates_semantics() -> None:
    data = _base()
    data["fpn"][2]["in1"] = 5  # cell 2 reads F5, leaving only F4 and F6 unconsumed
    with pytest.raises(UserError, match=r"genotype\.fpn: only 2 unconsumed"):
        Genotype.from_dict(data)


# ------------------------------------------------------------------------------------------------------------
# Released integer format
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda r: r.__setitem__(2, [4, 3, 4, 9, 1]), r"released genotype\[2\]\[3\] \(op2\): FPN op id 9 out of range 0\.\.4"),
        (lambda r: r.__setitem__(0, [3, 3, 4, 4, 2]), r"released genotype\[0\]\[4\] \(agg\): aggregation id 2 out of range 0\.\.1"),
        (lambda r: r.__setitem__(3, [1, 8, 4, 3, 1]), r"released genotype\[3\]\[1\] \(id2\): index 8 out of range 0\.\.6"),
        (lambda r: r.__setitem__(3, [1, 3, 4]), r"released genotype\[3\]: expected an FPN cell"),
        (lambda r: r.__setitem__(7, 7), r"released genotype\[7\] \(head share index\): 7 out of range 0\.\.6"),
        (lambda r: r.__setitem__(7, "0"), r"released genotype\[7\] \(head share index\): expected an integer"),
        (lambda r: r.__setitem__(8, [5, 6]), r"released genotype\[8\] \(head ops\)\[1\]: head op id 6 out of range 0\.\.5"),
        (lambda r: r.__setitem__(8, []), r"released genotype\[8\] \(head ops\): expected a non-empty list"),
        (lambda r: r.__setitem__(slice(0, 7), [[3, 3, 0, 0, 0], [4, 4, 0, 0, 0], [5, 5, 0, 0, 0]]), r"genotype\.fpn: only 1 unconsumed"),
    ],
)
def test_from_released_rejects_bad_lists(mutate, pattern: str) -> None:
    data = released_literal()
    mutate(data)
    with pytest.raises(UserError, match=pattern):
        Genotype.from_released(data)


def test_from_released_rejects_non_lists() -> None:
    with pytest.raises(UserError, match=r"^released genotype: expected a list"):
        Genotype.from_released({"fpn": []})
    with pytest.raises(UserError, match=r"^released genotype: expected a list"):
        Genotype.from_released([0, [1]])


def test_to_released_rejects_what_the_authors_format_cannot_hold() -> None:
    fpn = Genotype.from_released(RELEASED).fpn
    with pytest.raises(UserError, match=r"^genotype\.fpn: a PlainFPN has no released integer form"):
        Genotype(PlainFPN(), seq_head()).to_released()
    with pytest.raises(UserError, match=r"^genotype\.head: the released format has only the sequential head"):
        Genotype(fpn, GOOD_CELL_HEAD).to_released()
    with pytest.raises(UserError, match=r"^genotype\.head\.share_from: the released format has one share index"):
        Genotype(fpn, seq_head(share=(0, 1, 0, 0, 0))).to_released()
    assert Genotype(fpn, seq_head(share=(2,) * 5)).to_released()[-2:] == [2, [1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------------------------
# key(): equivalent genotypes collide, different ones do not
# ------------------------------------------------------------------------------------------------------------


def _swap_fpn_cell(g: Genotype, t: int) -> Genotype:
    cells = list(g.fpn)
    cells[t] = cells[t].swapped()
    return replace(g, fpn=tuple(cells))


def _swap_head_cell(head: CellHead, t: int) -> CellHead:
    """Swap cell t's branches and renumber later reads of its two op outputs (the equivalent genotype)."""
    o1 = 2 + 3 * t
    remap = {o1: o1 + 1, o1 + 1: o1}
    cells = list(head.cells)
    cells[t] = cells[t].swapped()
    for u in range(t + 1, len(cells)):
        cells[u] = replace(cells[u], in1=remap.get(cells[u].in1, cells[u].in1), in2=remap.get(cells[u].in2, cells[u].in2))
    return replace(head, cells=tuple(cells))


def _change_op(g: Genotype, t: int) -> Genotype:
    cells = list(g.fpn)
    c = cells[t]
    cells[t] = replace(c, op1="dcn3x3" if c.op1 != "dcn3x3" else "sep3x3")
    return replace(g, fpn=tuple(cells))


def test_key_properties_on_sampled_genotypes() -> None:
    rng = random.Random(3)
    for head_kind in ("sequential", "cell"):
        space = SearchSpace(head=head_kind)
        for _ in range(100):
            g = space.sample(rng)
            key = g.key()
            assert len(key) == 40 and int(key, 16) >= 0
            assert Genotype.from_json(g.to_json()).key() == key
            for t, c in enumerate(g.fpn):
                swapped = _swap_fpn_cell(g, t)
                if c.agg == "sum":
                    assert swapped.key() == key
                elif (c.in1, c.op1) != (c.in2, c.op2):
                    assert swapped.key() != key  # concat is order-sensitive
            t = rng.randrange(len(g.fpn))
            assert _change_op(g, t).key() != key
            if isinstance(g.head, CellHead):
                for t, c in enumerate(g.head.cells):
                    swapped = replace(g, head=_swap_head_cell(g.head, t))
                    swapped.validate()
                    if c.agg == "sum" or (c.in1, c.op1) == (c.in2, c.op2):
                        assert swapped.key() == key  # sum is symmetric; identical branches are twins
                    else:
                        assert swapped.key() != key
            else:
                other_ops = tuple(reversed(g.head.ops))
                if other_ops != g.head.ops:
                    assert replace(g, head=replace(g.head, ops=other_ops)).key() != key
            share = g.head.share_from
            bumped = tuple((share[0] + 1) % (g.head.num_layers + 1) for _ in share)
            assert replace(g, head=replace(g.head, share_from=bumped)).key() != key


def test_key_head_swap_without_renumbering_is_a_different_genotype() -> None:
    # Cell 0 = sum(skip(o0), sep3x3(p)); cell 1 reads pool entry 2, which is skip(o0) here and sep3x3(p) after a
    # bare swap. Only the renumbered swap is the same network.
    head = CellHead(
        "sep3x3",
        (HeadCell(1, 0, "skip", "sep3x3", "sum"), HeadCell(2, 4, "dcn3x3", "skip", "concat")),
        SHARE0,
    )
    g = Genotype(backbone_only(3), head)
    bare = replace(head, cells=(head.cells[0].swapped(), head.cells[1]))
    assert Genotype(backbone_only(3), _swap_head_cell(head, 0)).key() == g.key()
    assert Genotype(backbone_only(3), bare).key() != g.key()


def test_key_distinguishes_plain_fpns_and_validates() -> None:
    assert Genotype(PlainFPN("conv3x3"), seq_head()).key() != Genotype(PlainFPN("dcn3x3"), seq_head()).key()
    with pytest.raises(UserError):
        Genotype(backbone_only(2), seq_head()).key()


def test_canonical_is_idempotent_and_equivalent() -> None:
    rng = random.Random(11)
    space = SearchSpace(head="cell")
    for _ in range(50):
        g = space.sample(rng)
        c = g.canonical()
        assert c.canonical() == c
        assert c.key() == g.key()
        assert c.fpn_outputs() == g.fpn_outputs()  # swaps never move FPN outputs


# ------------------------------------------------------------------------------------------------------------
# Purity
# ------------------------------------------------------------------------------------------------------------


def test_space_package_never_imports_torch() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    for path in (src / "nasfcos" / "space").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import torch" not in text and "from torch" not in text, path
    code = (
        "import sys; import nasfcos.space, nasfcos.space.presets, nasfcos.space.search_space; "
        "from nasfcos.space import resolve_arch; resolve_arch('nas-fcos'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(src)})


def test_key_identifies_twin_outputs_of_a_cell_with_identical_branches() -> None:
    # Cell 0 = concat(sep3x3(o0), sep3x3(o0)): its outputs 2 and 3 are interchangeable, so a later cell that
    # reads 2 is the same network as one that reads 3; reading 4 (the aggregation) is not.
    def head_reading(index: int) -> Genotype:
        cells = (HeadCell(1, 1, "sep3x3", "sep3x3", "concat"), HeadCell(index, 0, "dcn3x3", "skip", "concat"))
        return Genotype(backbone_only(3), CellHead("skip", cells, SHARE0))

    assert head_reading(2).key() == head_reading(3).key()
    assert head_reading(2).key() != head_reading(4).key()
