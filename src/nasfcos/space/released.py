"""The authors' integer genotype format, and the discovered NAS-FCOS architecture as they released it.

The released code writes an architecture as integers: each FPN cell ``[id1, id2, op1, op2, agg]`` (ids index
the FPN pool, C2..C5 = 0..3 then one entry per earlier cell; ops index :data:`~nasfcos.space.ops.FPN_OPS`;
agg indexes :data:`~nasfcos.space.ops.AGGREGATIONS`), one head share index used for every pyramid level, and
the head ops as indices into :data:`~nasfcos.space.ops.HEAD_OPS`. We store that as one flat list::

    [[3, 3, 4, 4, 1], [3, 3, 4, 4, 1], ..., [7, 2, 4, 4, 1], 0, [5, 1, 5, 0, 4, 4]]
     ^ FPN cells (any number, in order)                      ^ share  ^ head ops

The authors' configs (the ``CONFIG:`` key of their search-model YAML files) spell the same list *nested*: every
FPN cell wrapped in a one-element list and the share index a one-element list::

    [[[3, 3, 4, 4, 1]], [[3, 3, 4, 4, 1]], ..., [[7, 2, 4, 4, 1]], [0], [5, 1, 5, 0, 4, 4]]

That is the form users paste, so both spellings are read everywhere a genotype is read (each cell and the
share index may be wrapped; nothing else may be), and ``Genotype.to_released(nested=True)`` writes it.

Only a searched FPN with a :class:`~nasfcos.space.genotype.SequentialHead` whose share index is the same on
every level has this form (the paper's cell head and per-level sharing were never released).

This module works on plain lists and the genotype's JSON dict, so that :mod:`nasfcos.space.genotype` can use
it without the two importing each other.
"""

from __future__ import annotations

from typing import Any

from nasfcos.errors import UserError
from nasfcos.space.ops import AGGREGATIONS, FPN_OPS, HEAD_OPS, NUM_LEVELS, fpn_pool_size
from nasfcos.space.ops import is_int as _is_int

# FACTS 3: the discovered architecture, identical in every released config.
RELEASED_FPN_CELLS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 3, 4, 4, 1),
    (3, 3, 4, 4, 1),
    (4, 3, 4, 3, 1),
    (1, 3, 4, 3, 1),
    (5, 3, 4, 4, 1),
    (4, 7, 4, 4, 1),
    (7, 2, 4, 4, 1),
)
RELEASED_SHARE_INDEX: int = 0
RELEASED_HEAD_OPS: tuple[int, ...] = (5, 1, 5, 0, 4, 4)

_CELL_FIELDS = ("id1", "id2", "op1", "op2", "agg")


def released_literal(nested: bool = False) -> list[Any]:
    """A fresh copy of the released genotype in the flat list layout above (``nested``: the authors' spelling)."""
    if nested:
        return [[list(cell)] for cell in RELEASED_FPN_CELLS] + [[RELEASED_SHARE_INDEX], list(RELEASED_HEAD_OPS)]
    return [list(cell) for cell in RELEASED_FPN_CELLS] + [RELEASED_SHARE_INDEX, list(RELEASED_HEAD_OPS)]


def _table_index(value: object, where: str, table: tuple[str, ...], what: str) -> str:
    if not _is_int(value):
        raise UserError(f"{where}: expected an integer {what} id (got {value!r})")
    if not 0 <= value < len(table):  # type: ignore[operator]
        listing = ", ".join(f"{i}={name}" for i, name in enumerate(table))
        raise UserError(f"{where}: {what} id {value} out of range 0..{len(table) - 1} ({listing})")
    return table[value]  # type: ignore[index]


def _unwrap_one(value: object) -> tuple[object, bool]:
    """``[x]`` (a one-element list, as the authors' configs wrap cells and the share index) -> ``(x, True)``."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0], True
    return value, False


def _cell_from_released(value: object, t: int, where: str) -> dict[str, Any]:
    inner, wrapped = _unwrap_one(value)
    if wrapped and isinstance(inner, (list, tuple)):
        value, where = inner, f"{where}[0]"
    if not isinstance(value, (list, tuple)) or len(value) != 5:
        raise UserError(
            f"{where}: expected an FPN cell [id1, id2, op1, op2, agg] of 5 integers, or one such cell in a list "
            f"as the authors' configs write it (got {value!r:.80})"
        )
    pool = fpn_pool_size(t)
    for position in (0, 1):
        index = value[position]
        field = f"{where}[{position}] ({_CELL_FIELDS[position]})"
        if not _is_int(index):
            raise UserError(f"{field}: expected an integer pool index (got {index!r})")
        if not 0 <= index < pool:
            raise UserError(f"{field}: index {index} out of range 0..{pool - 1} (pool has {pool} entries at cell {t})")
    return {
        "in1": value[0],
        "in2": value[1],
        "op1": _table_index(value[2], f"{where}[2] (op1)", FPN_OPS, "FPN op"),
        "op2": _table_index(value[3], f"{where}[3] (op2)", FPN_OPS, "FPN op"),
        "agg": _table_index(value[4], f"{where}[4] (agg)", AGGREGATIONS, "aggregation"),
    }


def released_to_dict(data: object, where: str = "released genotype") -> dict[str, Any]:
    """Parse ``[cell, ..., share_index, head_ops]`` (flat or the authors' nested spelling) into the genotype JSON
    dict (:meth:`Genotype.to_dict` layout), checking every integer; ``Genotype.from_released`` validates the rest."""
    if not isinstance(data, (list, tuple)) or len(data) < 3:
        raise UserError(
            f"{where}: expected a list [[id1, id2, op1, op2, agg], ..., share_index, [head ops]] (got {data!r:.80})"
        )
    *cell_values, share, head_values = data
    share, _ = _unwrap_one(share)
    cells = [_cell_from_released(value, t, f"{where}[{t}]") for t, value in enumerate(cell_values)]
    share_where = f"{where}[{len(cell_values)}] (head share index)"
    ops_where = f"{where}[{len(cell_values) + 1}] (head ops)"
    if not isinstance(head_values, (list, tuple)) or not head_values:
        raise UserError(f"{ops_where}: expected a non-empty list of head op ids (got {head_values!r})")
    ops = [_table_index(v, f"{ops_where}[{i}]", HEAD_OPS, "head op") for i, v in enumerate(head_values)]
    if not _is_int(share):
        raise UserError(f"{share_where}: expected an integer or a one-element list [index] (got {share!r:.80})")
    if not 0 <= share <= len(ops):
        raise UserError(f"{share_where}: {share} out of range 0..{len(ops)} (the head has {len(ops)} layers)")
    return {"fpn": cells, "head": {"type": "sequential", "ops": ops, "share_from": [share] * NUM_LEVELS}}


def dict_to_released(data: dict[str, Any], nested: bool = False) -> list[Any]:
    """The integer list of a (validated) genotype's JSON dict: searched FPN, sequential head, one share index.

    Flat by default; ``nested=True`` wraps every cell and the share index in a one-element list, as the
    authors' configs spell it (both are read back by :func:`released_to_dict`).
    """
    fpn, head = data["fpn"], data["head"]
    if isinstance(fpn, dict):
        raise UserError("genotype.fpn: a PlainFPN has no released integer form; expected searched FPN cells")
    if head["type"] != "sequential":
        kind = {"cell": "CellHead"}.get(head["type"], head["type"])
        raise UserError(f"genotype.head: the released format has only the sequential head (got {kind})")
    share_from = list(head["share_from"])
    if len(set(share_from)) != 1:
        raise UserError(
            f"genotype.head.share_from: the released format has one share index for every level "
            f"(got {share_from}); expected the same index on every level"
        )
    cells = [
        [cell["in1"], cell["in2"], FPN_OPS.index(cell["op1"]), FPN_OPS.index(cell["op2"]),
         AGGREGATIONS.index(cell["agg"])]
        for cell in fpn
    ]
    ops = [HEAD_OPS.index(op) for op in head["ops"]]
    if nested:
        return [[cell] for cell in cells] + [[share_from[0]], ops]
    return cells + [share_from[0], ops]
