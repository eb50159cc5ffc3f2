"""Pool arithmetic of the searched FPN and of the cell head: where each entry sits, and which entries are live.

Both the torch modules (which build and run only live entries, so that no parameter is left without a
gradient) and the drawings (which grey out dead entries) need the same answers; they ask here.

- FPN pool: indices ``0..3`` are C2..C5, cell ``t`` (0-based) writes index ``4 + t``. An entry is *live* when
  P3, P4, P5 or a dangling output depends on it (the output rule is :func:`~nasfcos.space.genotype.fpn_outputs`).
- Cell-head pool: ``0`` = p, ``1`` = o0 = op0(p); head cell ``t`` (0-based) writes its op outputs o1, o2 and
  their aggregation at :func:`head_cell_entries` ``(t)``; the head's output is the last cell's aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from nasfcos.errors import UserError
from nasfcos.space.genotype import CellHead, FPNCell, FPNOutputs
from nasfcos.space.ops import NUM_BACKBONE_FEATURES, head_pool_size

__all__ = ["cell_head_live_entries", "fpn_live_entries", "head_cell_entries", "head_output_index"]


def head_cell_entries(cell: int) -> tuple[int, int, int]:
    """Head-pool indices ``(o1, o2, aggregation)`` written by head cell ``cell`` (0-based)."""
    first = head_pool_size(cell)
    return first, first + 1, first + 2


def head_output_index(num_cells: int) -> int:
    """Head-pool index of a cell head's output: the aggregation of its last cell."""
    return head_pool_size(num_cells) - 1


def _reachable(roots: Iterable[int], inputs_of: Callable[[int], Sequence[int]]) -> set[int]:
    live: set[int] = set()
    stack = list(roots)
    while stack:
        index = stack.pop()
        if index not in live:
            live.add(index)
            stack.extend(inputs_of(index))
    return live


def fpn_live_entries(cells: Sequence[FPNCell], outputs: FPNOutputs) -> tuple[int, ...]:
    """FPN pool indices (backbone features included) that ``outputs`` depend on, ascending.

    Reaching an index outside the pool is a :class:`UserError` (an invalid genotype that was not validated).
    """
    size = NUM_BACKBONE_FEATURES + len(cells)

    def inputs_of(index: int) -> tuple[int, ...]:
        if not 0 <= index < size:
            raise UserError(f"fpn: pool index {index} out of range (pool has {size} entries)")
        if index < NUM_BACKBONE_FEATURES:
            return ()
        cell = cells[index - NUM_BACKBONE_FEATURES]
        return int(cell.in1), int(cell.in2)

    roots = [int(outputs.p5), int(outputs.p4), int(outputs.p3), *(int(i) for i in outputs.dangling)]
    return tuple(sorted(_reachable(roots, inputs_of)))


def cell_head_live_entries(head: CellHead) -> frozenset[int]:
    """Head-pool indices the head's output depends on (``0`` = p is always among them)."""
    inputs_of: dict[int, tuple[int, ...]] = {1: (0,)}
    for t, cell in enumerate(head.cells):
        o1, o2, agg = head_cell_entries(t)
        inputs_of[o1] = (int(cell.in1),)
        inputs_of[o2] = (int(cell.in2),)
        inputs_of[agg] = (o1, o2)
    return frozenset(_reachable([head_output_index(len(head.cells))], lambda index: inputs_of.get(index, ())))
