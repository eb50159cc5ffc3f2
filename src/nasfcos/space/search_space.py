"""The search space as a fixed sequence of discrete decisions, and the bijection with valid genotypes.

The controller samples one integer per :class:`Decision`, in this fixed order:

1. FPN, cell by cell (``t = 0 .. num_fpn_cells - 1``): ``fpn[t].in1``, ``fpn[t].in2`` (``4 + t`` choices
   each: pool C2..C5 then earlier cell outputs), ``fpn[t].op1``, ``fpn[t].op2`` (``len(fpn_ops)``),
   ``fpn[t].agg`` (``len(aggregations)``).
2. Head. Sequential (released): ``head.ops[i]`` for ``i < num_head_layers`` (``len(head_ops)`` choices).
   Cell (paper): ``head.op0``, then per head cell ``t``: ``head.cells[t].in1``, ``head.cells[t].in2``
   (``2 + 3 t`` choices: the head pool size), ``head.cells[t].op1``, ``head.cells[t].op2``,
   ``head.cells[t].agg``.
3. Share indices (``num_layers + 1`` choices, values ``0..num_layers``): ``head.share_from[l]`` for each of
   the ``num_levels`` levels when ``per_level_share``, else a single ``head.share_from`` applied to every level.

An action value is an index into this space's own tables (``fpn_ops``, ``aggregations``, ``head_ops``); with
the default tables these are the released integers. A fixed FPN or head (``fixed_fpn`` / ``fixed_head``)
removes its decisions (and, for a fixed head, the share decisions) from the sequence.

Validity. The only constraint that is not local to one decision is that at least three FPN cell outputs stay
unconsumed (P5, P4, P3). Since a later cell can always read backbone features (consuming nothing and adding one
unconsumed output), a partial FPN is completable iff ``unconsumed so far + cells still to create >= 3``.
:meth:`SearchSpace.valid_choices` allows exactly the choices after which this still holds, so a sampler that
follows the mask never meets a dead end and produces exactly the valid genotypes; :meth:`SearchSpace.size`
counts them exactly by dynamic programming over the number of unconsumed outputs. A :class:`Cursor`
(``space.start()``) gives the same masks incrementally (``mask()`` / ``push(action)``) for a controller that
samples one decision at a time.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from typing import Any, Sequence

from nasfcos.errors import UserError
from nasfcos.space.genotype import (
    FPN,
    CellHead,
    FPNCell,
    Genotype,
    Head,
    HeadCell,
    PlainFPN,
    SequentialHead,
    fpn_from_dict,
    fpn_pool_label,
    fpn_to_dict,
    head_from_dict,
    head_to_dict,
    validate_fpn,
    validate_head,
)
from nasfcos.space.ops import (
    AGGREGATIONS,
    CELL_HEAD_OPS,
    DEFAULT_NUM_FPN_CELLS,
    DEFAULT_NUM_HEAD_CELLS,
    DEFAULT_NUM_HEAD_LAYERS,
    FPN_OPS,
    HEAD_OPS,
    MIN_UNCONSUMED_OUTPUTS,
    NUM_BACKBONE_FEATURES,
    NUM_LEVELS,
    fpn_pool_size,
    head_pool_size,
    one_of,
)

HEAD_KINDS = ("sequential", "cell")


@dataclass(frozen=True)
class Decision:
    """One controller step: its field path (``name``), how many choices, a kind and a label per choice.

    ``kind`` is one of ``fpn_in, fpn_op, fpn_agg, head_op, head_in, head_agg, share`` (a controller may
    share embeddings by kind); ``labels[i]`` names choice ``i`` (a pool entry, an op name or a share index).
    """

    name: str
    num_choices: int
    kind: str = ""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Slot:
    """Where a decision's value goes: section, cell/layer/level index and field."""

    section: str  # "fpn", "head_ops", "head_op0", "head_cell", "share", "share_all"
    index: int
    field: str


def _check_op_set(ops: object, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if isinstance(ops, str) or not isinstance(ops, (list, tuple)) or not ops:
        raise UserError(f"search space: {what} must be a non-empty list of names (got {ops!r}); expected names from {one_of(allowed)}")
    for op in ops:
        if op not in allowed:
            raise UserError(f"search space: {what}: unknown name (got {op!r}); expected one of {one_of(allowed)}")
    if len(set(ops)) != len(ops):
        raise UserError(f"search space: {what}: duplicate names (got {list(ops)})")
    return tuple(ops)


def _check_count(value: object, what: str, minimum: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"search space: {what} must be an integer >= {minimum}{why} (got {value!r})")
    return value


def _as_action(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # accepts numpy / 0-d integer tensor values
    except TypeError:
        return None


class Cursor:
    """Incremental walk through the decisions: :meth:`mask` for the next one, :meth:`push` to take it.

    It tracks the FPN's unconsumed cell outputs so that both are O(number of choices). ``SearchSpace.start()``
    makes one; :meth:`SearchSpace.valid_choices` replays a prefix through one; a controller can keep one per
    sampled architecture instead of replaying.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.actions: list[int] = []
        self._unconsumed: set[int] = set()
        self._pending_in1 = -1

    @property
    def done(self) -> bool:
        """True once every decision has an action."""
        return len(self.actions) == len(self.space.decisions)

    def copy(self) -> Cursor:
        """An independent cursor at the same position."""
        other = Cursor(self.space)
        other.actions = list(self.actions)
        other._unconsumed = set(self._unconsumed)
        other._pending_in1 = self._pending_in1
        return other

    def _slot(self) -> tuple[_Slot, Decision]:
        position = len(self.actions)
        if position >= len(self.space.decisions):
            raise UserError(f"actions: all {len(self.space.decisions)} decisions are already taken")
        return self.space._slots[position], self.space.decisions[position]

    def _reachable(self, slot: _Slot, choice: int) -> int:
        """Most unconsumed outputs reachable if this cell reads ``choice`` and all later cells read backbone."""
        consumed = {choice, self._pending_in1} if slot.field == "in2" else {choice}
        after = len(self._unconsumed - consumed) + 1
        return after + (self.space.num_fpn_cells - slot.index - 1)

    def mask(self) -> tuple[bool, ...]:
        """Which choices of the next decision keep the architecture completable into a valid genotype."""
        slot, decision = self._slot()
        if slot.section != "fpn" or slot.field not in ("in1", "in2"):
            return (True,) * decision.num_choices
        remaining = self.space.num_fpn_cells - slot.index - 1
        others = self._unconsumed - ({self._pending_in1} if slot.field == "in2" else set())
        best = len(others) + 1 + remaining  # reading a backbone feature or an already-read output
        if best - 1 >= MIN_UNCONSUMED_OUTPUTS:  # even consuming one more output stays completable
            return (True,) * decision.num_choices
        return tuple(best - (c in others) >= MIN_UNCONSUMED_OUTPUTS for c in range(decision.num_choices))

    def push(self, value: object) -> None:
        """Take one action; :class:`UserError` names the decision when it is out of range or not allowed."""
        slot, decision = self._slot()
        position = len(self.actions)
        action = value if type(value) is int else _as_action(value)
        if action is None:
            raise UserError(f"actions[{position}] ({decision.name}): expected an integer choice (got {value!r})")
        if not 0 <= action < decision.num_choices:
            raise UserError(
                f"actions[{position}] ({decision.name}): choice {action} out of range 0..{decision.num_choices - 1}"
            )
        if slot.section == "fpn" and slot.field in ("in1", "in2"):
            if not self.mask()[action]:
                raise UserError(
                    f"actions[{position}] ({decision.name}): choice {action} ({decision.labels[action]}) is not allowed here: it leaves at most "
                    f"{self._reachable(slot, action)} unconsumed FPN cell outputs; expected at least "
                    f"{MIN_UNCONSUMED_OUTPUTS} for P5, P4, P3"
                )
            if slot.field == "in1":
                self._pending_in1 = action
            else:
                self._unconsumed -= {self._pending_in1, action}
                self._unconsumed.add(NUM_BACKBONE_FEATURES + slot.index)
        self.actions.append(action)


class SearchSpace:
    """Decisions <-> genotypes for the NAS-FCOS decoder space (see the module docstring for the order).

    ``head`` picks the released sequential head (``num_head_layers`` ops from ``head_ops``, default
    :data:`HEAD_OPS`) or the paper's cell head (``op0`` + ``num_head_cells`` cells over ``head_ops``, default
    :data:`CELL_HEAD_OPS`). ``per_level_share`` defaults to False for the sequential head (the released single
    index) and True for the cell head (paper Sec. 3.2.3). ``fixed_fpn`` / ``fixed_head`` hold one part fixed and
    search only the other (``fixed_head`` includes its share indices; ``head`` is then taken from its type).
    """

    def __init__(
        self,
        num_fpn_cells: int = DEFAULT_NUM_FPN_CELLS,
        num_head_cells: int = DEFAULT_NUM_HEAD_CELLS,
        head: str = "sequential",
        num_head_layers: int = DEFAULT_NUM_HEAD_LAYERS,
        fpn_ops: Sequence[str] = FPN_OPS,
        aggregations: Sequence[str] = AGGREGATIONS,
        head_ops: Sequence[str] | None = None,
        num_levels: int = NUM_LEVELS,
        per_level_share: bool | None = None,
        fixed_fpn: FPN | None = None,
        fixed_head: Head | None = None,
    ) -> None:
        self.num_levels = _check_count(num_levels, "num_levels", 1)
        if fixed_fpn is not None:
            if isinstance(fixed_fpn, list):
                fixed_fpn = tuple(fixed_fpn)
            validate_fpn(fixed_fpn, "search space: fixed_fpn")
        if fixed_head is not None:
            validate_head(fixed_head, "search space: fixed_head", num_levels=self.num_levels)
            head = "cell" if isinstance(fixed_head, CellHead) else "sequential"
        if head not in HEAD_KINDS:
            raise UserError(f"search space: head: unknown head kind (got {head!r}); expected one of {one_of(HEAD_KINDS)}")
        self.head_kind: str = head
        self.fixed_fpn: FPN | None = fixed_fpn
        self.fixed_head: Head | None = fixed_head
        if fixed_fpn is None:
            self.num_fpn_cells = _check_count(
                num_fpn_cells, "num_fpn_cells", MIN_UNCONSUMED_OUTPUTS, " (P5, P4, P3 need three unconsumed cell outputs)"
            )
        else:
            self.num_fpn_cells = 0 if isinstance(fixed_fpn, PlainFPN) else len(fixed_fpn)
        self.num_head_cells = _check_count(num_head_cells, "num_head_cells", 1)
        self.num_head_layers = _check_count(num_head_layers, "num_head_layers", 1)
        self.fpn_ops = _check_op_set(fpn_ops, FPN_OPS, "fpn_ops")
        self.aggregations = _check_op_set(aggregations, AGGREGATIONS, "aggregations")
        default_head_ops = HEAD_OPS if head == "sequential" else CELL_HEAD_OPS
        self.head_ops = _check_op_set(default_head_ops if head_ops is None else head_ops, default_head_ops, "head_ops")
        if per_level_share is None:
            per_level_share = head == "cell"
        self.per_level_share = bool(per_level_share)
        if fixed_head is not None:
            self.num_head_layers = fixed_head.num_layers
            if isinstance(fixed_head, CellHead):
                self.num_head_cells = len(fixed_head.cells)
        self._slots, self.decisions = self._build_decisions()

    # -- structure ---------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Layers counted by the share indices: ops (sequential) or op0 + cells (cell head)."""
        return self.num_head_layers if self.head_kind == "sequential" else 1 + self.num_head_cells

    def _build_decisions(self) -> tuple[tuple[_Slot, ...], tuple[Decision, ...]]:
        slots: list[_Slot] = []
        decisions: list[Decision] = []

        def add(slot: _Slot, name: str, kind: str, labels: Sequence[str]) -> None:
            slots.append(slot)
            decisions.append(Decision(name=name, num_choices=len(labels), kind=kind, labels=tuple(labels)))

        def add_cell(section: str, prefix: str, t: int, pool_labels: Sequence[str], ops: Sequence[str], kind: str) -> None:
            for field in ("in1", "in2"):
                add(_Slot(section, t, field), f"{prefix}[{t}].{field}", f"{kind}_in", pool_labels)
            for field in ("op1", "op2"):
                add(_Slot(section, t, field), f"{prefix}[{t}].{field}", f"{kind}_op", ops)
            add(_Slot(section, t, "agg"), f"{prefix}[{t}].agg", f"{kind}_agg", self.aggregations)

        if self.fixed_fpn is None:
            for t in range(self.num_fpn_cells):
                labels = [fpn_pool_label(i) for i in range(fpn_pool_size(t))]
                add_cell("fpn", "fpn", t, labels, self.fpn_ops, "fpn")
        if self.fixed_head is None:
            if self.head_kind == "sequential":
                for i in range(self.num_head_layers):
                    add(_Slot("head_ops", i, "op"), f"head.ops[{i}]", "head_op", self.head_ops)
            else:
                add(_Slot("head_op0", 0, "op0"), "head.op0", "head_op", self.head_ops)
                for t in range(self.num_head_cells):
                    labels = [f"h{i}" for i in range(head_pool_size(t))]
                    add_cell("head_cell", "head.cells", t, labels, self.head_ops, "head")
            share_labels = [str(v) for v in range(self.num_layers + 1)]
            if self.per_level_share:
                for level in range(self.num_levels):
                    add(_Slot("share", level, "share_from"), f"head.share_from[{level}]", "share", share_labels)
            else:
                add(_Slot("share_all", 0, "share_from"), "head.share_from", "share", share_labels)
        return tuple(slots), tuple(decisions)

    # -- masks, decoding, encoding -----------------------------------------------------------------------

    def start(self) -> Cursor:
        """A fresh :class:`Cursor` before the first decision."""
        return Cursor(self)

    def _replay(self, actions: Sequence[object], where: str = "actions") -> Cursor:
        if isinstance(actions, (str, bytes)) or not hasattr(actions, "__len__"):
            raise UserError(f"{where}: expected a sequence of integer choices (got {type(actions).__name__})")
        if len(actions) > len(self.decisions):
            raise UserError(f"{where}: {len(actions)} choices; this search space has {len(self.decisions)} decisions")
        cursor = Cursor(self)
        for value in actions:
            cursor.push(value)
        return cursor

    def valid_choices(self, prefix: Sequence[int]) -> tuple[bool, ...]:
        """Mask over the next decision's choices given the earlier ``prefix`` (which must itself be valid)."""
        cursor = self._replay(prefix)
        if len(cursor.actions) == len(self.decisions):
            raise UserError(
                f"actions: a prefix of {len(prefix)} choices leaves no next decision "
                f"(this search space has {len(self.decisions)})"
            )
        return cursor.mask()

    def decode(self, actions: Sequence[int]) -> Genotype:
        """The genotype of a full action sequence; :class:`UserError` names the bad decision and value."""
        cursor = self._replay(actions)
        if len(cursor.actions) != len(self.decisions):
            raise UserError(
                f"actions: expected {len(self.decisions)} choices, one per decision (got {len(cursor.actions)})"
            )
        values = cursor.actions
        fpn_cells: dict[int, dict[str, Any]] = {}
        head_cells: dict[int, dict[str, Any]] = {}
        head_ops: dict[int, str] = {}
        op0 = ""
        share = [0] * self.num_levels
        for slot, decision, value in zip(self._slots, self.decisions, values):
            label: Any = value if slot.field in ("in1", "in2") or slot.section.startswith("share") else decision.labels[value]
            if slot.section == "fpn":
                fpn_cells.setdefault(slot.index, {})[slot.field] = label
            elif slot.section == "head_cell":
                head_cells.setdefault(slot.index, {})[slot.field] = label
            elif slot.section == "head_ops":
                head_ops[slot.index] = label
            elif slot.section == "head_op0":
                op0 = label
            elif slot.section == "share":
                share[slot.index] = label
            else:  # share_all
                share = [label] * self.num_levels
        if self.fixed_fpn is not None:
            fpn: FPN = self.fixed_fpn
        else:
            fpn = tuple(FPNCell(**fpn_cells[t]) for t in range(self.num_fpn_cells))
        if self.fixed_head is not None:
            head: Head = self.fixed_head
        elif self.head_kind == "sequential":
            head = SequentialHead(ops=tuple(head_ops[i] for i in range(self.num_head_layers)), share_from=tuple(share))
        else:
            cells = tuple(HeadCell(**head_cells[t]) for t in range(self.num_head_cells))
            head = CellHead(op0=op0, cells=cells, share_from=tuple(share))
        return Genotype(fpn=fpn, head=head).validate(num_levels=self.num_levels)

    def encode(self, genotype: Genotype) -> tuple[int, ...]:
        """The action sequence of ``genotype`` (exact inverse of :meth:`decode`); :class:`UserError` if outside."""
        if not isinstance(genotype, Genotype):
            raise UserError(f"genotype: expected a Genotype (got {type(genotype).__name__})")
        genotype.validate(num_levels=self.num_levels)
        actions: list[int] = []

        def index_of(value: str, table: tuple[str, ...], where: str, what: str) -> int:
            if value not in table:
                raise UserError(f"{where}: {value!r} is not among this search space's {what} ({one_of(table)})")
            return table.index(value)

        def encode_cell(cell: Any, where: str, ops: tuple[str, ...], what: str) -> None:
            actions.extend((cell.in1, cell.in2))
            actions.append(index_of(cell.op1, ops, f"{where}.op1", what))
            actions.append(index_of(cell.op2, ops, f"{where}.op2", what))
            actions.append(index_of(cell.agg, self.aggregations, f"{where}.agg", "aggregations"))

        if self.fixed_fpn is not None:
            if genotype.fpn != self.fixed_fpn:
                raise UserError("genotype.fpn: differs from this search space's fixed FPN")
        else:
            if isinstance(genotype.fpn, PlainFPN):
                raise UserError("genotype.fpn: a PlainFPN is not in this search space; expected searched FPN cells")
            if len(genotype.fpn) != self.num_fpn_cells:
                raise UserError(
                    f"genotype.fpn: has {len(genotype.fpn)} cells; this search space has {self.num_fpn_cells}"
                )
            for t, cell in enumerate(genotype.fpn):
                encode_cell(cell, f"genotype.fpn[{t}]", self.fpn_ops, "FPN ops")
        head = genotype.head
        if self.fixed_head is not None:
            if head != self.fixed_head:
                raise UserError("genotype.head: differs from this search space's fixed head")
            return tuple(actions)
        if self.head_kind == "sequential":
            if not isinstance(head, SequentialHead):
                raise UserError(f"genotype.head: expected a SequentialHead in this search space (got {type(head).__name__})")
            if len(head.ops) != self.num_head_layers:
                raise UserError(
                    f"genotype.head.ops: has {len(head.ops)} layers; this search space has {self.num_head_layers}"
                )
            for i, op in enumerate(head.ops):
                actions.append(index_of(op, self.head_ops, f"genotype.head.ops[{i}]", "head ops"))
        else:
            if not isinstance(head, CellHead):
                raise UserError(f"genotype.head: expected a CellHead in this search space (got {type(head).__name__})")
            if len(head.cells) != self.num_head_cells:
                raise UserError(
                    f"genotype.head.cells: has {len(head.cells)} cells; this search space has {self.num_head_cells}"
                )
            actions.append(index_of(head.op0, self.head_ops, "genotype.head.op0", "head ops"))
            for t, cell in enumerate(head.cells):
                encode_cell(cell, f"genotype.head.cells[{t}]", self.head_ops, "head ops")
        if self.per_level_share:
            actions.extend(head.share_from)
        else:
            if len(set(head.share_from)) != 1:
                raise UserError(
                    f"genotype.head.share_from: differs across levels (got {list(head.share_from)}); this search "
                    "space uses one share index for every level"
                )
            actions.append(head.share_from[0])
        return tuple(actions)

    def contains(self, genotype: Genotype) -> bool:
        """Whether :meth:`encode` accepts ``genotype``."""
        try:
            self.encode(genotype)
        except UserError:
            return False
        return True

    def sample(self, rng: random.Random | int) -> Genotype:
        """A valid genotype drawn by following the masks uniformly per decision (same seed, same samples)."""
        return self.decode(self.sample_actions(rng))

    def sample_actions(self, rng: random.Random | int) -> tuple[int, ...]:
        """The action sequence behind :meth:`sample`."""
        if isinstance(rng, int) and not isinstance(rng, bool):
            rng = random.Random(rng)
        cursor = Cursor(self)
        for _ in self.decisions:
            allowed = [i for i, ok in enumerate(cursor.mask()) if ok]
            cursor.push(rng.choice(allowed))
        return tuple(cursor.actions)

    # -- counting ----------------------------------------------------------------------------------------

    def _fpn_connection_count(self) -> int:
        """Valid (in1, in2) sequences, by DP over u = number of currently unconsumed cell outputs.

        At cell ``t`` the pool has ``4 + t`` entries of which ``u`` are unconsumed cell outputs and
        ``m = 4 + t - u`` are not (backbone or already read). An ordered pair (in1, in2) consumes ``k`` distinct
        unconsumed entries: ``k = 0`` in ``m*m`` ways, ``k = 1`` in ``2*m*u + u`` ways (one of each, or the same
        entry twice), ``k = 2`` in ``u*(u-1)`` ways; then the new output makes ``u - k + 1``.
        """
        ways = {0: 1}
        for t in range(self.num_fpn_cells):
            pool = fpn_pool_size(t)
            nxt: dict[int, int] = {}
            for u, count in ways.items():
                m = pool - u
                for k, n_pairs in ((0, m * m), (1, 2 * m * u + u), (2, u * (u - 1))):
                    if n_pairs:
                        nxt[u - k + 1] = nxt.get(u - k + 1, 0) + count * n_pairs
            ways = nxt
        return sum(count for u, count in ways.items() if u >= MIN_UNCONSUMED_OUTPUTS)

    def size(self) -> int:
        """Exact number of distinct valid action sequences (= genotypes this space can decode)."""
        total = 1
        if self.fixed_fpn is None:
            per_cell = len(self.fpn_ops) ** 2 * len(self.aggregations)
            total *= self._fpn_connection_count() * per_cell**self.num_fpn_cells
        if self.fixed_head is None:
            ops = len(self.head_ops)
            if self.head_kind == "sequential":
                total *= ops**self.num_head_layers
            else:
                total *= ops
                for t in range(self.num_head_cells):
                    total *= head_pool_size(t) ** 2 * ops**2 * len(self.aggregations)
            share_choices = self.num_layers + 1
            total *= share_choices ** (self.num_levels if self.per_level_share else 1)
        return total

    # -- identity ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The configuration (JSON-ready) that reconstructs this space with ``SearchSpace.from_dict``."""
        fixed_fpn = None if self.fixed_fpn is None else fpn_to_dict(self.fixed_fpn)
        fixed_head = None if self.fixed_head is None else head_to_dict(self.fixed_head)
        return {
            "num_fpn_cells": self.num_fpn_cells,
            "num_head_cells": self.num_head_cells,
            "head": self.head_kind,
            "num_head_layers": self.num_head_layers,
            "fpn_ops": list(self.fpn_ops),
            "aggregations": list(self.aggregations),
            "head_ops": list(self.head_ops),
            "num_levels": self.num_levels,
            "per_level_share": self.per_level_share,
            "fixed_fpn": fixed_fpn,
            "fixed_head": fixed_head,
        }

    @classmethod
    def from_dict(cls, data: object) -> SearchSpace:
        """Rebuild from :meth:`to_dict` output (unknown keys are a :class:`UserError`)."""
        if not isinstance(data, dict):
            raise UserError(f"search space: expected a JSON object (got {type(data).__name__})")
        allowed = cls().to_dict().keys()
        for key in data:
            if key not in allowed:
                raise UserError(f"search space: unknown key {key!r}; expected keys {one_of(tuple(allowed))}")
        kwargs = dict(data)
        if kwargs.get("fixed_fpn") is not None:
            kwargs["fixed_fpn"] = fpn_from_dict(kwargs["fixed_fpn"], "search space: fixed_fpn")
        if kwargs.get("fixed_head") is not None:
            kwargs["fixed_head"] = head_from_dict(kwargs["fixed_head"], "search space: fixed_head")
        return cls(**kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if v is not None)
        return f"SearchSpace({args})"
