"""What one NAS-FCOS decoder architecture is: frozen, torch-free dataclasses plus validation and formats.

A :class:`Genotype` is an FPN (a tuple of :class:`FPNCell` built on the backbone pool, or the hand-designed
:class:`PlainFPN`) and a head (the released :class:`SequentialHead` or the paper's :class:`CellHead`). Ops are
readable names from :mod:`nasfcos.space.ops`. Constructing a genotype checks nothing (so that a bad one can be
built, inspected and reported); :meth:`Genotype.validate` checks everything and raises
:class:`~nasfcos.errors.UserError` naming the field path and value. Every constructor that reads user input
(``from_dict``, ``from_json``, ``from_released``, ``SearchSpace.decode``) validates.

FPN output rule (paper eq. 1 as the released code implements it, FACTS 2): a cell output is *unconsumed* when
no later cell reads it (backbone features never count). The last three unconsumed cell outputs in creation
order become P5, P4, P3 (the newest is P3); every other unconsumed cell output is *dangling* and is added to
each of the three. Fewer than three unconsumed cell outputs is invalid. :func:`fpn_outputs` returns the pool
indices (pool index ``i < 4`` is backbone ``C{i+2}``, index ``i >= 4`` is the output of cell ``i - 4``, written
``F{i}``).

Head weight sharing: ``share_from`` has one entry per pyramid level P3..P7; layer ``i`` of level ``l`` has its
own weights when ``i < share_from[l]`` and uses the weights shared by all levels otherwise. A sequential head
has ``len(ops)`` layers; a cell head has ``1 + len(cells)`` layers (layer 0 is ``op0``, layer ``t`` is cell
``t``, 1-based). Valid share values are ``0..num_layers`` inclusive.

JSON format (``to_dict`` / ``to_json``; ``from_dict`` rejects unknown keys)::

    {"fpn": [{"in1": 3, "in2": 3, "op1": "dcn3x3", "op2": "dcn3x3", "agg": "concat"}, ...],
     "head": {"type": "sequential", "ops": ["dcn3x3", "conv3x3", ...], "share_from": [0, 0, 0, 0, 0]}}

``"fpn"`` is either that list of cells or ``{"plain": "conv3x3"}`` / ``{"plain": "dcn3x3"}``. A cell head is
``{"type": "cell", "op0": "sep3x3", "cells": [{"in1": 1, "in2": 0, "op1": ..., "op2": ..., "agg": ...}, ...],
"share_from": [...]}``. On input ``share_from`` may also be a single integer, meaning the same index on every
level.

Canonical key (:meth:`Genotype.key`): the sha1 hex digest of the canonical compact JSON of
:meth:`Genotype.canonical`. Genotypes that differ only by swapping the two (input, op) branches of a cell whose
aggregation is symmetric (``sum``) get the same key. ``concat`` is treated as order-sensitive: the released
grouped 1x1 conv lets each half of the output channels see only one input, so swapping changes the
function family's parameterisation. In a cell head, swapping a sum cell's branches also swaps the pool
positions of its two op outputs, so later reads of them are renumbered accordingly; and a head cell whose two
branches are identical (same input, same op) has interchangeable outputs o1 and o2 whatever its aggregation,
so exchanging later reads of them is also an equivalence. Nothing else is identified (a sequential head's key
is its ops and share indices verbatim; dead head cells are kept).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from typing import Any, Sequence, TypeVar, Union

from nasfcos.errors import UserError
from nasfcos.space.ops import (
    AGGREGATIONS,
    BACKBONE_STRIDES,
    CELL_HEAD_OPS,
    FPN_OPS,
    HEAD_OPS,
    LEVEL_NAMES,
    MIN_UNCONSUMED_OUTPUTS,
    NUM_BACKBONE_FEATURES,
    NUM_LEVELS,
    PLAIN_FPN_CONVS,
    PYRAMID_STRIDES,
    SYMMETRIC_AGGREGATIONS,
    fpn_pool_size,
    head_pool_size,
    one_of,
)
from nasfcos.space.ops import is_int as _is_int
from nasfcos.space.released import dict_to_released, released_to_dict

_CellT = TypeVar("_CellT", bound="_Cell")


# ----------------------------------------------------------------------------------------------------------
# Dataclasses
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    """A basic block (paper Fig. 1): ``agg(op1(pool[in1]), op2(pool[in2]))``."""

    in1: int
    in2: int
    op1: str
    op2: str
    agg: str

    def swapped(self: _CellT) -> _CellT:
        """The same block with its two (input, op) branches exchanged."""
        return replace(self, in1=self.in2, in2=self.in1, op1=self.op2, op2=self.op1)

    def to_dict(self) -> dict[str, Any]:
        return {"in1": self.in1, "in2": self.in2, "op1": self.op1, "op2": self.op2, "agg": self.agg}


@dataclass(frozen=True)
class FPNCell(_Cell):
    """One FPN block; its output joins the FPN pool (cell ``t`` reads among ``4 + t`` entries)."""


@dataclass(frozen=True)
class HeadCell(_Cell):
    """One block of the paper's cell head; its two op outputs and its aggregation join the head pool."""


@dataclass(frozen=True)
class PlainFPN:
    """The hand-designed FPN (lateral 1x1 + output ``conv`` on C3..C5): ``"conv3x3"`` or ``"dcn3x3"``."""

    conv: str = "conv3x3"


def _as_tuple(obj: object, name: str) -> None:
    """Turn a list field into a tuple (so that genotypes hash and compare); other types are left for validate."""
    value = getattr(obj, name)
    if isinstance(value, list):
        object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True)
class SequentialHead:
    """The released head: a plain sequence of ops (per tower) and one share index per pyramid level."""

    ops: tuple[str, ...]
    share_from: tuple[int, ...]

    def __post_init__(self) -> None:
        _as_tuple(self, "ops")
        _as_tuple(self, "share_from")

    @property
    def num_layers(self) -> int:
        """Number of layers that ``share_from`` counts (one per op)."""
        return len(self.ops)


@dataclass(frozen=True)
class CellHead:
    """The paper's head (Sec. 3.2.2): ``op0`` on p, then cells over the pool {p, o0, o1, o2, a, ...}."""

    op0: str
    cells: tuple[HeadCell, ...]
    share_from: tuple[int, ...]

    def __post_init__(self) -> None:
        _as_tuple(self, "cells")
        _as_tuple(self, "share_from")

    @property
    def num_layers(self) -> int:
        """Number of layers that ``share_from`` counts: ``op0`` plus one per cell."""
        return 1 + len(self.cells)

    @property
    def output_index(self) -> int:
        """Head pool index of the head's output: the last cell's aggregation."""
        return head_pool_size(len(self.cells)) - 1


Head = Union[SequentialHead, CellHead]
FPN = Union[tuple[FPNCell, ...], PlainFPN]


@dataclass(frozen=True)
class FPNOutputs:
    """Pool indices of the searched FPN's outputs: P5, P4, P3 and the dangling outputs added to each."""

    p5: int
    p4: int
    p3: int
    dangling: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------
# Pool helpers and the FPN output rule
# ----------------------------------------------------------------------------------------------------------


def fpn_pool_label(index: int) -> str:
    """``C2..C5`` for the backbone entries, ``F{index}`` for cell outputs (FACTS 3 naming)."""
    if not _is_int(index):
        return f"?{index!r}"
    return f"C{index + 2}" if index < NUM_BACKBONE_FEATURES else f"F{index}"


def unconsumed_outputs(cells: Sequence[_Cell]) -> tuple[int, ...]:
    """Pool indices of cell outputs that no later cell reads, in creation order (backbone never counts)."""
    read = {index for cell in cells for index in (cell.in1, cell.in2)}
    return tuple(
        NUM_BACKBONE_FEATURES + t for t in range(len(cells)) if NUM_BACKBONE_FEATURES + t not in read
    )


def _too_few_message(where: str, unconsumed: tuple[int, ...]) -> str:
    names = ", ".join(fpn_pool_label(i) for i in unconsumed) or "none"
    return (
        f"{where}: only {len(unconsumed)} unconsumed cell output(s) ({names}); expected at least "
        f"{MIN_UNCONSUMED_OUTPUTS} (the last three unread cell outputs become P5, P4, P3)"
    )


def fpn_outputs(cells: Sequence[FPNCell], where: str = "genotype.fpn") -> FPNOutputs:
    """Apply the output rule; :class:`UserError` when fewer than three cell outputs are unconsumed."""
    unconsumed = unconsumed_outputs(cells)
    if len(unconsumed) < MIN_UNCONSUMED_OUTPUTS:
        raise UserError(_too_few_message(where, unconsumed))
    p5, p4, p3 = unconsumed[-3:]
    return FPNOutputs(p5=p5, p4=p4, p3=p3, dangling=unconsumed[:-3])


def fpn_pool_strides(cells: Sequence[FPNCell]) -> tuple[int, ...]:
    """Stride of every FPN pool entry: a cell works at the finer of its two inputs' strides.

    The smaller input is upsampled to the larger (paper Fig. 1). Entries of cells with out-of-range inputs
    get stride 0 so that an invalid genotype can still be described.
    """
    strides = list(BACKBONE_STRIDES)
    for cell in cells:
        inputs = [strides[i] for i in (cell.in1, cell.in2) if _is_int(i) and 0 <= i < len(strides)]
        strides.append(min(inputs) if len(inputs) == 2 else 0)
    return tuple(strides)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_index(value: object, where: str, pool: int, cell: int) -> None:
    if not _is_int(value):
        raise UserError(f"{where}: expected an integer pool index (got {value!r})")
    if not 0 <= value < pool:  # type: ignore[operator]
        raise UserError(
            f"{where}: index {value} out of range 0..{pool - 1} (pool has {pool} entries at cell {cell})"
        )


def _check_name(value: object, where: str, allowed: Sequence[str], what: str) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise UserError(f"{where}: unknown {what} (got {value!r}); expected one of {one_of(tuple(allowed))}")


def _check_cell(cell: object, where: str, cls: type, t: int, pool: int, ops: Sequence[str], what: str) -> None:
    if not isinstance(cell, cls):
        raise UserError(f"{where}: expected a cell of type {cls.__name__} (got {type(cell).__name__})")
    assert isinstance(cell, _Cell)
    _check_index(cell.in1, f"{where}.in1", pool, t)
    _check_index(cell.in2, f"{where}.in2", pool, t)
    _check_name(cell.op1, f"{where}.op1", ops, what)
    _check_name(cell.op2, f"{where}.op2", ops, what)
    _check_name(cell.agg, f"{where}.agg", AGGREGATIONS, "aggregation")


def validate_fpn(fpn: object, where: str = "genotype.fpn") -> None:
    """Check a searched FPN (tuple of cells) or a :class:`PlainFPN`; :class:`UserError` names the field."""
    if isinstance(fpn, PlainFPN):
        _check_name(fpn.conv, f"{where}.conv", PLAIN_FPN_CONVS, "plain FPN conv")
        return
    if not isinstance(fpn, tuple):
        raise UserError(f"{where}: expected a tuple of FPNCell or a PlainFPN (got {type(fpn).__name__})")
    if not fpn:
        raise UserError(f"{where}: no cells; expected at least {MIN_UNCONSUMED_OUTPUTS} FPN cells")
    for t, cell in enumerate(fpn):
        _check_cell(cell, f"{where}[{t}]", FPNCell, t, fpn_pool_size(t), FPN_OPS, "FPN op")
    fpn_outputs(fpn, where)


def _check_share_from(share_from: object, where: str, num_layers: int, num_levels: int) -> None:
    levels = " ".join(LEVEL_NAMES[:num_levels]) if num_levels <= len(LEVEL_NAMES) else f"{num_levels} levels"
    if not isinstance(share_from, tuple):
        raise UserError(
            f"{where}: expected a list of {num_levels} share indices, one per level {levels} (got {share_from!r})"
        )
    if len(share_from) != num_levels:
        raise UserError(
            f"{where}: expected {num_levels} entries, one per pyramid level {levels} (got {len(share_from)})"
        )
    for level, value in enumerate(share_from):
        if not _is_int(value):
            raise UserError(f"{where}[{level}]: expected an integer share index (got {value!r})")
        if not 0 <= value <= num_layers:
            raise UserError(
                f"{where}[{level}]: share index {value} out of range 0..{num_layers} "
                f"(the head has {num_layers} layers)"
            )


def validate_head(head: object, where: str = "genotype.head", num_levels: int = NUM_LEVELS) -> None:
    """Check a :class:`SequentialHead` or :class:`CellHead`; :class:`UserError` names the field."""
    if isinstance(head, SequentialHead):
        if not isinstance(head.ops, tuple) or not head.ops:
            raise UserError(f"{where}.ops: expected a non-empty list of head ops (got {head.ops!r})")
        for i, op in enumerate(head.ops):
            _check_name(op, f"{where}.ops[{i}]", HEAD_OPS, "head op")
    elif isinstance(head, CellHead):
        _check_name(head.op0, f"{where}.op0", CELL_HEAD_OPS, "cell-head op")
        if not isinstance(head.cells, tuple) or not head.cells:
            raise UserError(f"{where}.cells: expected a non-empty list of HeadCell (got {head.cells!r})")
        for t, cell in enumerate(head.cells):
            _check_cell(cell, f"{where}.cells[{t}]", HeadCell, t, head_pool_size(t), CELL_HEAD_OPS, "cell-head op")
    else:
        raise UserError(f"{where}: expected a SequentialHead or a CellHead (got {type(head).__name__})")
    _check_share_from(head.share_from, f"{where}.share_from", head.num_layers, num_levels)


# ----------------------------------------------------------------------------------------------------------
# JSON reading helpers
# ----------------------------------------------------------------------------------------------------------


def _expect_object(value: object, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object (got {type(value).__name__}: {value!r:.60})")
    for key in required:
        if key not in value:
            raise UserError(f"{where}: missing key {key!r}; expected keys {one_of(tuple(required))}")
    allowed = set(required) | set(optional)
    for key in value:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}; expected keys {one_of(tuple(required) + tuple(optional))}")
    return value


def _expect_list(value: object, where: str, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected a list of {what} (got {type(value).__name__}: {value!r:.60})")
    return list(value)


_CELL_KEYS = ("in1", "in2", "op1", "op2", "agg")


def _cell_from_dict(data: object, where: str, cls: type[_CellT]) -> _CellT:
    obj = _expect_object(data, where, _CELL_KEYS)
    return cls(**{key: obj[key] for key in _CELL_KEYS})


def _share_from_value(value: object, where: str) -> tuple:
    if _is_int(value):
        return (value,) * NUM_LEVELS
    return tuple(_expect_list(value, where, "share indices (or one integer for every level)"))


def fpn_from_dict(data: object, where: str = "genotype.fpn") -> FPN:
    """Parse the ``"fpn"`` JSON value (list of cells or ``{"plain": conv}``) without validating it."""
    if isinstance(data, dict):
        obj = _expect_object(data, where, ("plain",))
        return PlainFPN(conv=obj["plain"])
    cells = _expect_list(data, where, 'FPN cells (or {"plain": "conv3x3"})')
    return tuple(_cell_from_dict(cell, f"{where}[{t}]", FPNCell) for t, cell in enumerate(cells))


def head_from_dict(data: object, where: str = "genotype.head") -> Head:
    """Parse the ``"head"`` JSON value without validating it."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object (got {type(data).__name__}: {data!r:.60})")
    kind = data.get("type")
    if kind == "sequential":
        obj = _expect_object(data, where, ("type", "ops", "share_from"))
        ops = tuple(_expect_list(obj["ops"], f"{where}.ops", "head op names"))
        return SequentialHead(ops=ops, share_from=_share_from_value(obj["share_from"], f"{where}.share_from"))
    if kind == "cell":
        obj = _expect_object(data, where, ("type", "op0", "cells", "share_from"))
        cells = _expect_list(obj["cells"], f"{where}.cells", "head cells")
        return CellHead(
            op0=obj["op0"],
            cells=tuple(_cell_from_dict(c, f"{where}.cells[{t}]", HeadCell) for t, c in enumerate(cells)),
            share_from=_share_from_value(obj["share_from"], f"{where}.share_from"),
        )
    raise UserError(f"{where}.type: unknown head type (got {kind!r}); expected one of sequential, cell")


def fpn_to_dict(fpn: FPN) -> Any:
    """The ``"fpn"`` JSON value: a list of cell objects, or ``{"plain": conv}``."""
    if isinstance(fpn, PlainFPN):
        return {"plain": fpn.conv}
    return [cell.to_dict() for cell in fpn]


def head_to_dict(head: Head) -> dict[str, Any]:
    """The ``"head"`` JSON value."""
    if isinstance(head, SequentialHead):
        return {"type": "sequential", "ops": list(head.ops), "share_from": list(head.share_from)}
    return {
        "type": "cell",
        "op0": head.op0,
        "cells": [cell.to_dict() for cell in head.cells],
        "share_from": list(head.share_from),
    }


# ----------------------------------------------------------------------------------------------------------
# Canonical form
# ----------------------------------------------------------------------------------------------------------


def _branch_order(index: int, op: str, ops: Sequence[str]) -> tuple[int, int]:
    return (index, ops.index(op))


def _canonical_fpn(cells: tuple[FPNCell, ...]) -> tuple[FPNCell, ...]:
    out = []
    for cell in cells:
        if cell.agg in SYMMETRIC_AGGREGATIONS and _branch_order(cell.in2, cell.op2, FPN_OPS) < _branch_order(
            cell.in1, cell.op1, FPN_OPS
        ):
            cell = cell.swapped()
        out.append(cell)
    return tuple(out)


def _relabel_cell_head(head: CellHead, flips: dict[int, bool]) -> CellHead:
    """Renumber reads through earlier swaps, sort each sum cell's branches, apply the given twin flips.

    ``flips`` holds the cells whose two branches are identical (same input, same op): their outputs o1 and o2
    are interchangeable whatever the aggregation, so whether later reads of them are exchanged is a free choice.
    """
    mapping: dict[int, int] = {}  # original head pool index -> index in the relabelled head
    cells = []
    for t, cell in enumerate(head.cells):
        cell = replace(cell, in1=mapping.get(cell.in1, cell.in1), in2=mapping.get(cell.in2, cell.in2))
        if t in flips:
            exchange = flips[t]
        else:
            exchange = cell.agg in SYMMETRIC_AGGREGATIONS and _branch_order(
                cell.in2, cell.op2, CELL_HEAD_OPS
            ) < _branch_order(cell.in1, cell.op1, CELL_HEAD_OPS)
            if exchange:
                cell = cell.swapped()
        if exchange:
            first = head_pool_size(t)  # pool index of this cell's o1; o2 is first + 1
            mapping[first], mapping[first + 1] = first + 1, first
        cells.append(cell)
    return replace(head, cells=tuple(cells))


def _head_order(head: CellHead) -> tuple:
    return tuple(
        (c.in1, c.in2, CELL_HEAD_OPS.index(c.op1), CELL_HEAD_OPS.index(c.op2), AGGREGATIONS.index(c.agg))
        for c in head.cells
    )


def _canonical_cell_head(head: CellHead) -> CellHead:
    """The smallest relabelling over all choices for twin cells (at most 2**len(cells) candidates)."""
    twins = [t for t, c in enumerate(head.cells) if (c.in1, c.op1) == (c.in2, c.op2)]
    candidates = (
        _relabel_cell_head(head, dict(zip(twins, choice)))
        for choice in itertools.product((False, True), repeat=len(twins))
    )
    return min(candidates, key=_head_order)


# ----------------------------------------------------------------------------------------------------------
# Genotype
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Genotype:
    """A decoder architecture: searched FPN cells (or a PlainFPN) and a sequential or cell head."""

    fpn: FPN
    head: Head

    def __post_init__(self) -> None:
        _as_tuple(self, "fpn")

    # -- checks and derived facts ------------------------------------------------------------------------

    def validate(self, num_levels: int = NUM_LEVELS) -> Genotype:
        """Raise :class:`UserError` naming the first bad field; return ``self`` when valid."""
        validate_fpn(self.fpn)
        validate_head(self.head, num_levels=num_levels)
        return self

    @property
    def searched_fpn(self) -> bool:
        """True for a tuple of FPN cells, False for a :class:`PlainFPN`."""
        return not isinstance(self.fpn, PlainFPN)

    def fpn_outputs(self) -> FPNOutputs:
        """P5, P4, P3 and dangling pool indices of the searched FPN (the output rule, FACTS 2)."""
        if isinstance(self.fpn, PlainFPN):
            raise TypeError("fpn_outputs() needs a searched FPN; this genotype has a PlainFPN")
        return fpn_outputs(self.fpn)

    # -- formats -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON-ready dict (see the module docstring)."""
        return {"fpn": fpn_to_dict(self.fpn), "head": head_to_dict(self.head)}

    @classmethod
    def from_dict(cls, data: object, num_levels: int = NUM_LEVELS) -> Genotype:
        """Parse and validate the JSON dict; :class:`UserError` names the bad key or value."""
        obj = _expect_object(data, "genotype", ("fpn", "head"))
        genotype = cls(fpn=fpn_from_dict(obj["fpn"]), head=head_from_dict(obj["head"]))
        return genotype.validate(num_levels=num_levels)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; with ``indent`` each cell stays on one line so the file reads like a table."""
        data = self.to_dict()
        if indent is None:
            return json.dumps(data, separators=(",", ":"))
        pad = " " * indent

        def dump_value(value: Any, depth: int) -> str:
            if isinstance(value, list) and value and isinstance(value[0], dict):
                inner = pad * (depth + 1)
                rows = ",\n".join(inner + json.dumps(item) for item in value)
                return "[\n" + rows + "\n" + pad * depth + "]"
            if isinstance(value, dict) and any(isinstance(v, list) and v and isinstance(v[0], dict) for v in value.values()):
                return dump_object(value, depth)
            return json.dumps(value)

        def dump_object(obj: dict, depth: int) -> str:
            inner = pad * (depth + 1)
            rows = ",\n".join(f"{inner}{json.dumps(k)}: {dump_value(v, depth + 1)}" for k, v in obj.items())
            return "{\n" + rows + "\n" + pad * depth + "}"

        return dump_object(data, 0) + "\n"

    @classmethod
    def from_json(cls, text: str, num_levels: int = NUM_LEVELS) -> Genotype:
        """Parse JSON text (a genotype object, or a released integer list) and validate it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"genotype JSON: malformed at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if isinstance(data, list):
            return cls.from_released(data)
        return cls.from_dict(data, num_levels=num_levels)

    def to_released(self, nested: bool = False) -> list:
        """The authors' integer list ``[cell, ..., share_index, head_ops]`` (see :mod:`nasfcos.space.released`).

        ``nested=True`` writes their configs' spelling: each cell and the share index in a one-element list.
        """
        self.validate()
        return dict_to_released(self.to_dict(), nested=nested)

    @classmethod
    def from_released(cls, data: object) -> Genotype:
        """Parse and validate the authors' integer list, flat or nested (see :mod:`nasfcos.space.released`)."""
        return cls.from_dict(released_to_dict(data))

    # -- identity ----------------------------------------------------------------------------------------

    def canonical(self) -> Genotype:
        """The representative of this genotype's equivalence class (see the module docstring)."""
        share_from = getattr(self.head, "share_from", None)
        self.validate(num_levels=len(share_from) if isinstance(share_from, tuple) else NUM_LEVELS)
        fpn = self.fpn if isinstance(self.fpn, PlainFPN) else _canonical_fpn(self.fpn)
        head = _canonical_cell_head(self.head) if isinstance(self.head, CellHead) else self.head
        return Genotype(fpn=fpn, head=head)

    def key(self) -> str:
        """sha1 hex of the canonical compact JSON; equivalent genotypes share it."""
        text = json.dumps(self.canonical().to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    # -- display -----------------------------------------------------------------------------------------

    def describe(self) -> str:
        """Multi-line readable form, e.g. ``F4 = concat(dcn3x3(C5), dcn3x3(C5))`` per FPN cell."""
        return "\n".join(_describe_fpn(self.fpn) + _describe_head(self.head))

    def __str__(self) -> str:
        return self.describe()


# ----------------------------------------------------------------------------------------------------------
# describe()
# ----------------------------------------------------------------------------------------------------------


def _apply(op: str, operand: str) -> str:
    return operand if op == "skip" else f"{op}({operand})"


def _describe_fpn(fpn: FPN) -> list[str]:
    if isinstance(fpn, PlainFPN):
        return [
            f"FPN: plain (lateral conv1x1 on C3..C5, top-down sum, output {fpn.conv} per level)",
            "  P6 = conv3x3/s2(P5); P7 = conv3x3/s2(relu(P6))",
        ]
    strides = fpn_pool_strides(fpn)
    lines = [f"FPN: searched, {len(fpn)} cells (pool C2..C5 = 0..3, cell outputs F4..F{3 + len(fpn)})"]
    for t, cell in enumerate(fpn):
        index = NUM_BACKBONE_FEATURES + t
        expr = (
            f"{cell.agg}({_apply(cell.op1, fpn_pool_label(cell.in1))}, "
            f"{_apply(cell.op2, fpn_pool_label(cell.in2))})"
        )
        stride = f"  [stride {strides[index]}]" if strides[index] else ""
        lines.append(f"  {fpn_pool_label(index)} = {expr}{stride}")
    try:
        outputs = fpn_outputs(fpn)
    except (UserError, TypeError) as exc:
        lines.append(f"  outputs: invalid: {exc}")
        return lines
    extra = "".join(f" + {fpn_pool_label(i)}" for i in outputs.dangling)
    for name, index in (("P5", outputs.p5), ("P4", outputs.p4), ("P3", outputs.p3)):
        stride = PYRAMID_STRIDES[LEVEL_NAMES.index(name)]
        lines.append(f"  {name} = {fpn_pool_label(index)}{extra}  [resized to stride {stride}]")
    lines.append("  P6 = conv3x3/s2(P5); P7 = conv3x3/s2(relu(P6))")
    return lines


def _layer_range(start: int, stop: int) -> str:
    return f"layer {start}" if stop - start == 1 else f"layers {start}..{stop - 1}"


def _describe_sharing(share_from: tuple[int, ...], num_layers: int) -> str:
    values = set(share_from)
    if len(values) == 1:
        (value,) = values
        if value == 0:
            return f"all {num_layers} layers shared across levels (share_from 0 on every level)"
        if value == num_layers:
            return f"no layer shared: every level has its own weights (share_from {value} on every level)"
        return (
            f"{_layer_range(0, value)} level-specific, {_layer_range(value, num_layers)} shared across levels "
            f"(share_from {value} on every level)"
        )
    per_level = ", ".join(f"{LEVEL_NAMES[l] if l < len(LEVEL_NAMES) else l}:{v}" for l, v in enumerate(share_from))
    return f"share_from per level {per_level} (layer i is level-specific when i < share_from)"


def _describe_head(head: Head) -> list[str]:
    if isinstance(head, SequentialHead):
        return [
            f"Head: sequential, {len(head.ops)} layers per tower (+ GN + ReLU each)",
            "  " + " -> ".join(head.ops),
            "  sharing: " + _describe_sharing(head.share_from, head.num_layers),
        ]
    lines = [f"Head: cell, op0 + {len(head.cells)} cells (pool h0 = p, h1 = o0, then o1, o2, a per cell)"]
    lines.append(f"  h1 = {_apply(head.op0, 'h0')}")
    for t, cell in enumerate(head.cells):
        first = head_pool_size(t)
        lines.append(
            f"  cell {t + 1}: h{first} = {_apply(cell.op1, f'h{cell.in1}')}; "
            f"h{first + 1} = {_apply(cell.op2, f'h{cell.in2}')}; "
            f"h{first + 2} = {cell.agg}(h{first}, h{first + 1})"
        )
    lines.append(f"  output = h{head.output_index}")
    lines.append("  sharing: " + _describe_sharing(head.share_from, head.num_layers))
    return lines
