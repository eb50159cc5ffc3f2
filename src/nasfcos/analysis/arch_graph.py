"""Draw a decoder genotype as a graph (paper Fig. 4) and tabulate it for the report.

One graph model, two renderers. :func:`build_graph` turns a :class:`~nasfcos.space.genotype.Genotype` into
nodes and edges:

- FPN (group ``"fpn"``): backbone inputs ``C2..C5`` (unread ones drawn as unused), per searched cell
  ``F{i}`` two op nodes ``F{i}_op1`` / ``F{i}_op2`` (labelled with the op, ``skip`` included) fed by the cell's
  inputs, and the aggregation node ``F{i}`` (label: name, ``sum``/``concat``, stride); outputs ``P3..P5``
  fed by their chosen cell (solid) and by every dangling output (dashed, added to each level), then ``P6``,
  ``P7`` from ``P5``. A :class:`PlainFPN` becomes lateral 1x1s, the top-down sums and output convs.
- Head (group ``"head"``): the released sequential head as a chain of layers, each labelled with its op and
  which levels have their own weights at that layer (``share_from``); the paper's cell head as its pool graph
  (``h0 = p``, ``h1 = op0(h0)``, per cell two op nodes and the aggregation), dead cells drawn as unused.

:func:`to_dot` writes Graphviz DOT text (always returned and saved, so the drawing can be redone anywhere);
:func:`render_arch` renders it with Graphviz's ``dot`` when that binary is on ``PATH`` and otherwise with a
matplotlib layered layout (columns by longest path from the inputs, op nodes pulled next to their
aggregation, rows ordered by the mean position of each node's inputs). Both write the PNG atomically.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfcos.io import atomic_write_bytes, atomic_write_text
from nasfcos.space.genotype import (
    CellHead,
    FPNCell,
    Genotype,
    PlainFPN,
    SequentialHead,
    fpn_outputs,
    fpn_pool_label,
    fpn_pool_strides,
)
from nasfcos.space.ops import BACKBONE_STRIDES, LEVEL_NAMES, NUM_BACKBONE_FEATURES, PYRAMID_STRIDES, head_pool_size
from nasfcos.space.pools import cell_head_live_entries

__all__ = [
    "ArchGraph",
    "ArchRender",
    "Edge",
    "Node",
    "build_graph",
    "find_dot",
    "genotype_table_md",
    "render_arch",
    "to_dot",
]

ENGINES = ("auto", "dot", "matplotlib")

# Fill colours: ops by family (deformable, separable, plain conv, identity), then the other node kinds.
_OP_COLOURS = {
    "dcn3x3": "#f4a582",
    "sep3x3": "#b8e186",
    "sep3x3_d3": "#b8e186",
    "sep5x5_d6": "#b8e186",
    "conv1x1": "#92c5de",
    "conv3x3": "#92c5de",
    "skip": "#ffffff",
}
_KIND_COLOURS = {"input": "#e0e0e0", "agg": "#d9c4ec", "output": "#fee08b", "unused": "#ffffff"}
_LEGEND = (
    ("backbone / head input", "#e0e0e0"),
    ("dcn3x3 (deformable)", "#f4a582"),
    ("separable conv", "#b8e186"),
    ("plain conv", "#92c5de"),
    ("skip (identity)", "#ffffff"),
    ("aggregation (sum / concat)", "#d9c4ec"),
    ("output", "#fee08b"),
)


@dataclass(frozen=True)
class Node:
    """A graph node. ``kind``: input, op, agg, output or unused; ``op`` names the op of an op node."""

    id: str
    label: str
    kind: str
    group: str
    rank: float = 0.0  # order hint inside a column (stride, creation order)
    op: str = ""
    at: tuple[int, float] | None = None  # fixed (column, row) for the matplotlib layout, when known

    @property
    def colour(self) -> str:
        if self.kind == "op":
            return _OP_COLOURS.get(self.op, "#ffffff")
        return _KIND_COLOURS.get(self.kind, "#ffffff")


@dataclass(frozen=True)
class Edge:
    """A directed edge; ``style`` is ``"solid"`` or ``"dashed"`` (a dangling output added to a level)."""

    src: str
    dst: str
    label: str = ""
    style: str = "solid"


@dataclass(frozen=True)
class ArchGraph:
    """Nodes and edges of one genotype, grouped into the FPN and the head, with a caption per group."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    title: str = ""
    captions: dict[str, str] = field(default_factory=dict)

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(node.group for node in self.nodes))


@dataclass(frozen=True)
class ArchRender:
    """What :func:`render_arch` wrote: the PNG, the DOT file and text, and the engine that drew the PNG."""

    png: Path
    dot_path: Path
    dot_text: str
    engine: str
    note: str = ""


# ----------------------------------------------------------------------------------------------------------
# Graph model
# ----------------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.edges: list[Edge] = []

    def node(self, *args: Any, **kwargs: Any) -> None:
        self.nodes.append(Node(*args, **kwargs))

    def edge(self, src: str, dst: str, label: str = "", style: str = "solid") -> None:
        self.edges.append(Edge(src, dst, label, style))


def _levels(indices: Sequence[int]) -> str:
    return ",".join(LEVEL_NAMES[l] if l < len(LEVEL_NAMES) else str(l) for l in indices)


def _add_pyramid_tail(b: _Builder, column: int | None = None) -> None:
    b.node("P6", "P6  /64", "output", "fpn", rank=6, at=None if column is None else (column, 3.0))
    b.node("P7", "P7  /128", "output", "fpn", rank=7, at=None if column is None else (column, 4.0))
    b.edge("P5", "P6", "conv3x3 s2")
    b.edge("P6", "P7", "relu, conv3x3 s2")


def _searched_fpn(b: _Builder, cells: tuple[FPNCell, ...]) -> str:
    outputs = fpn_outputs(cells)
    strides = fpn_pool_strides(cells)
    read = {i for cell in cells for i in (cell.in1, cell.in2)}
    for i in range(NUM_BACKBONE_FEATURES):
        name = fpn_pool_label(i)
        used = i in read
        b.node(name, f"{name}  /{BACKBONE_STRIDES[i]}" + ("" if used else "\n(unused)"),
               "input" if used else "unused", "fpn", rank=i)
    for t, cell in enumerate(cells):
        index = NUM_BACKBONE_FEATURES + t
        name = fpn_pool_label(index)
        for branch, (source, op) in enumerate(((cell.in1, cell.op1), (cell.in2, cell.op2)), start=1):
            op_id = f"{name}_op{branch}"
            b.node(op_id, op, "op", "fpn", rank=index + branch / 10, op=op)
            b.edge(fpn_pool_label(source), op_id)
            b.edge(op_id, name)
        b.node(name, f"{name}\n{cell.agg}  /{strides[index]}", "agg", "fpn", rank=index)
    for level, index in (("P3", outputs.p3), ("P4", outputs.p4), ("P5", outputs.p5)):
        stride = PYRAMID_STRIDES[LEVEL_NAMES.index(level)]
        b.node(level, f"{level}  /{stride}", "output", "fpn", rank=int(level[1]))
        b.edge(fpn_pool_label(index), level)
        for extra in outputs.dangling:
            b.edge(fpn_pool_label(extra), level, "+", "dashed")
    _add_pyramid_tail(b)
    extra = ", ".join(fpn_pool_label(i) for i in outputs.dangling)
    caption = f"FPN: {len(cells)} searched cells (/s = stride)"
    if extra:
        caption += f"; dashed: dangling {extra} added to P3, P4, P5"
    return caption


def _plain_fpn(b: _Builder, fpn: PlainFPN) -> str:
    # A fixed structure, so a fixed layout: one row per level, columns input, lateral, top-down, output conv.
    b.node("C2", "C2  /4\n(unused)", "unused", "fpn", rank=0, at=(0, -1.0))
    for k in (3, 4, 5):
        row = float(k - 3)
        b.node(f"C{k}", f"C{k}  /{2 ** k}", "input", "fpn", rank=k - 2, at=(0, row))
        b.node(f"lat{k}", "conv1x1", "op", "fpn", rank=k, op="conv1x1", at=(1, row))
        b.edge(f"C{k}", f"lat{k}")
    b.node("M4", "sum  /16", "agg", "fpn", rank=4, at=(2, 1.0))
    b.node("M3", "sum  /8", "agg", "fpn", rank=3, at=(2, 0.0))
    b.edge("lat4", "M4")
    b.edge("lat5", "M4", "upsample 2x")
    b.edge("lat3", "M3")
    b.edge("M4", "M3", "upsample 2x")
    for k, source in ((3, "M3"), (4, "M4"), (5, "lat5")):
        row = float(k - 3)
        b.node(f"out{k}", fpn.conv, "op", "fpn", rank=k, op=fpn.conv, at=(3, row))
        b.edge(source, f"out{k}")
        b.node(f"P{k}", f"P{k}  /{2 ** k}", "output", "fpn", rank=k, at=(4, row))
        b.edge(f"out{k}", f"P{k}")
    _add_pyramid_tail(b, column=4)
    return f"FPN: hand-designed (lateral 1x1, top-down sums, {fpn.conv} outputs; /s = stride)"


def _sharing_caption(share_from: tuple[int, ...], num_layers: int) -> str:
    per_level = " ".join(f"{_levels([l])}:{v}" for l, v in enumerate(share_from))
    return (f"share_from {per_level} of {num_layers} layers "
            "(layer i, counted from 0, has per-level weights when i < share_from)")


def _layer_sharing(share_from: tuple[int, ...], layer: int) -> str:
    own = [l for l, v in enumerate(share_from) if layer < v]
    if not own:
        return "shared"
    if len(own) == len(share_from):
        return "per level"
    return f"own: {_levels(own)}"


def _sequential_head(b: _Builder, head: SequentialHead) -> str:
    b.node("head_in", "P3..P7\n(each level)", "input", "head", rank=0)
    previous = "head_in"
    for i, op in enumerate(head.ops):
        node_id = f"L{i}"
        b.node(node_id, f"L{i}: {op}\n{_layer_sharing(head.share_from, i)}", "op", "head", rank=0, op=op)
        b.edge(previous, node_id)
        previous = node_id
    b.node("predictors", "cls / box / ctr\npredictors", "output", "head", rank=0)
    b.edge(previous, "predictors")
    return (f"Head: sequential, {len(head.ops)} layers per tower (cls and reg towers alike); "
            + _sharing_caption(head.share_from, head.num_layers))


def _cell_head(b: _Builder, head: CellHead) -> str:
    live = cell_head_live_entries(head)  # the pool entries that feed the output; the rest are drawn as unused

    def kind(index: int, default: str) -> str:
        return default if index in live else "unused"

    b.node("h0", "h0 = p\n(each level)", "input", "head", rank=0)
    b.node("h1", f"h1: {head.op0}\n{_layer_sharing(head.share_from, 0)}", kind(1, "op"), "head", rank=1,
           op=head.op0)
    b.edge("h0", "h1")
    for t, cell in enumerate(head.cells):
        first = head_pool_size(t)
        sharing = _layer_sharing(head.share_from, t + 1)
        for offset, (source, op) in enumerate(((cell.in1, cell.op1), (cell.in2, cell.op2))):
            index = first + offset
            b.node(f"h{index}", f"h{index}: {op}", kind(index, "op"), "head", rank=index, op=op)
            b.edge(f"h{source}", f"h{index}")
        agg = first + 2
        b.node(f"h{agg}", f"h{agg}: {cell.agg}\ncell {t + 1}, {sharing}", kind(agg, "agg"), "head", rank=agg)
        b.edge(f"h{first}", f"h{agg}")
        b.edge(f"h{first + 1}", f"h{agg}")
    b.node("predictors", "cls / box / ctr\npredictors", "output", "head", rank=0)
    b.edge(f"h{head.output_index}", "predictors")
    return (f"Head: cell head, op0 + {len(head.cells)} cells per tower (cls and reg towers alike); "
            + _sharing_caption(head.share_from, head.num_layers))


def build_graph(genotype: Genotype, title: str = "") -> ArchGraph:
    """The drawable graph of ``genotype`` (validated first; an invalid genotype raises ``UserError``)."""
    genotype.validate(num_levels=len(genotype.head.share_from))
    b = _Builder()
    captions = {}
    if isinstance(genotype.fpn, PlainFPN):
        captions["fpn"] = _plain_fpn(b, genotype.fpn)
    else:
        captions["fpn"] = _searched_fpn(b, genotype.fpn)
    if isinstance(genotype.head, SequentialHead):
        captions["head"] = _sequential_head(b, genotype.head)
    else:
        captions["head"] = _cell_head(b, genotype.head)
    return ArchGraph(nodes=tuple(b.nodes), edges=tuple(b.edges), title=title, captions=captions)


# ----------------------------------------------------------------------------------------------------------
# DOT
# ----------------------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_BACKBONE_IDS = frozenset(fpn_pool_label(i) for i in range(NUM_BACKBONE_FEATURES))
_DOT_SHAPES = {"input": "box", "op": "box", "agg": "ellipse", "output": "box", "unused": "box"}
_DOT_STYLES = {"input": "filled", "op": "rounded,filled", "agg": "filled", "output": "bold,filled",
               "unused": "dashed"}


def _dot_node(node: Node) -> str:
    attrs = [f"label={_quote(node.label)}", f"shape={_DOT_SHAPES.get(node.kind, 'box')}",
             f"style={_quote(_DOT_STYLES.get(node.kind, 'filled'))}", f"fillcolor={_quote(node.colour)}"]
    if node.kind == "unused":
        attrs += ['color="#999999"', 'fontcolor="#777777"']
    return f"    {_quote(node.id)} [{', '.join(attrs)}];"


def _dot_edge(edge: Edge) -> str:
    attrs = []
    if edge.label:
        attrs.append(f"label={_quote(edge.label)}")
    if edge.style != "solid":
        attrs += [f"style={edge.style}", 'color="#666666"']
    suffix = f" [{', '.join(attrs)}]" if attrs else ""
    return f"  {_quote(edge.src)} -> {_quote(edge.dst)}{suffix};"


def to_dot(graph: ArchGraph) -> str:
    """Graphviz DOT text: one cluster per group, inputs on one rank and P3..P5 on one rank.

    The clusters are not joined by edges (the head reads every level), so ``dot`` lays them out as separate
    components: the head cluster is written first, which ``dot`` places below the FPN.
    """
    lines = [
        "digraph nasfcos {",
        f"  graph [rankdir=LR, fontname=\"Helvetica\", nodesep=0.25, ranksep=0.45, labelloc=t, "
        f"label={_quote(graph.title)}];",
        '  node [fontname="Helvetica", fontsize=11, margin="0.12,0.05"];',
        '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.7];',
    ]
    for group in reversed(graph.groups()):
        members = [n for n in graph.nodes if n.group == group]
        lines.append(f"  subgraph cluster_{group} {{")
        lines.append(f"    label={_quote(graph.captions.get(group, group))}; color=\"#bbbbbb\";")
        lines.extend(_dot_node(node) for node in members)
        same_rank = (
            [n.id for n in members if n.id in _BACKBONE_IDS],
            [n.id for n in members if n.id in ("P3", "P4", "P5")],
        )
        for ids in same_rank:
            if len(ids) > 1:
                lines.append("    { rank=same; " + " ".join(_quote(i) + ";" for i in ids) + " }")
        lines.append("  }")
    lines.extend(_dot_edge(edge) for edge in graph.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def find_dot() -> str | None:
    """Path of Graphviz's ``dot`` binary, or ``None`` when it is not installed."""
    return shutil.which("dot")


def _render_with_dot(dot_binary: str, dot_text: str, timeout: float = 60.0) -> bytes:
    """PNG bytes from ``dot -Tpng`` (argument list, no shell); ``RuntimeError`` with dot's message on failure."""
    completed = subprocess.run(
        [dot_binary, "-Tpng", "-Gdpi=120"], input=dot_text.encode("utf-8"), capture_output=True,
        timeout=timeout, check=False,
    )
    if completed.returncode != 0 or not completed.stdout.startswith(b"\x89PNG"):
        message = completed.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"dot failed (exit {completed.returncode}): {message[0] if message else 'no output'}")
    return completed.stdout


# ----------------------------------------------------------------------------------------------------------
# Matplotlib layered layout
# ----------------------------------------------------------------------------------------------------------


def _columns(nodes: Sequence[Node], edges: Sequence[Edge]) -> dict[str, int]:
    """Column per node: longest path from the inputs, ops pulled right next to what they feed, outputs last."""
    ids = [n.id for n in nodes]
    preds: dict[str, list[str]] = {i: [] for i in ids}
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for e in edges:
        if e.src in preds and e.dst in preds:
            preds[e.dst].append(e.src)
            succs[e.src].append(e.dst)
    kind = {n.id: n.kind for n in nodes}
    outputs = {n.id for n in nodes if n.kind == "output"}
    column: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in column:
            inner = [p for p in preds[node_id] if p not in outputs or node_id not in outputs]
            column[node_id] = 1 + max((depth(p) for p in inner), default=-1)
        return column[node_id]

    for node_id in ids:
        depth(node_id)
    if outputs:
        last = max(column[i] for i in outputs)
        for node_id in outputs:
            column[node_id] = last
    # Pull non-input nodes right, next to their first consumer (latest first so chains move together).
    for node_id in sorted(ids, key=lambda i: -column[i]):
        if kind[node_id] in ("input", "output") or not succs[node_id]:
            continue
        target = min(column[s] for s in succs[node_id]) - 1
        if target > column[node_id]:
            column[node_id] = target
    return column


def _rows(nodes: Sequence[Node], edges: Sequence[Edge], column: dict[str, int]) -> dict[str, float]:
    """Row per node (0 at the top).

    The op nodes of a cell are *attached* to its aggregation (an op whose only consumer is an aggregation in
    the next column): each cell is placed as a unit, its aggregation at the mean row of the cell's inputs and
    its two ops just above and below it. Columns of inputs or outputs are ordered by rank (stride); other
    nodes by the mean row of their inputs, at least one row apart (two for aggregations with attached ops).
    """
    kind = {n.id: n.kind for n in nodes}
    preds: dict[str, list[str]] = {n.id: [] for n in nodes}
    succs: dict[str, list[str]] = {n.id: [] for n in nodes}
    for e in edges:
        if e.src in preds and e.dst in preds:
            preds[e.dst].append(e.src)
            succs[e.src].append(e.dst)
    attached = {
        n.id: succs[n.id][0] for n in nodes
        if kind[n.id] in ("op", "unused") and len(succs[n.id]) == 1 and kind[succs[n.id][0]] in ("agg", "unused")
        and column[succs[n.id][0]] == column[n.id] + 1 and succs[n.id][0].startswith(("F", "h", "M"))
    }
    ops_of: dict[str, list[str]] = {}
    for op_id, agg_id in attached.items():
        ops_of.setdefault(agg_id, []).append(op_id)

    def sources(node_id: str) -> list[str]:
        out: list[str] = []
        for p in preds[node_id]:
            out.extend(preds[p] if p in attached else [p])
        return out

    row: dict[str, float] = {}
    order = {n.id: k for k, n in enumerate(nodes)}
    by_column: dict[int, list[Node]] = {}
    for node in nodes:
        if node.id not in attached:
            by_column.setdefault(column[node.id], []).append(node)
    for col in sorted(by_column):
        members = by_column[col]
        desired = {}
        for node in members:
            placed = [row[p] for p in sources(node.id) if p in row]
            desired[node.id] = sum(placed) / len(placed) if placed else node.rank
        if all(n.kind in ("input", "output") or n.id in _BACKBONE_IDS for n in members):
            members = sorted(members, key=lambda n: (n.rank, order[n.id]))
            ys = [float(k) for k in range(len(members))]
        else:
            members = sorted(members, key=lambda n: (desired[n.id], n.rank, order[n.id]))
            ys = []
            for node in members:
                gap = 2.0 if len(ops_of.get(node.id, ())) > 1 else 1.0
                ys.append(desired[node.id] if not ys else max(desired[node.id], ys[-1] + gap))
        shift = sum(desired[n.id] - y for n, y in zip(members, ys)) / len(members)
        for node, y in zip(members, ys):
            row[node.id] = y + shift
    for agg_id, op_ids in ops_of.items():
        offsets = [0.0] if len(op_ids) == 1 else [k - (len(op_ids) - 1) / 2 for k in range(len(op_ids))]
        for op_id, offset in zip(sorted(op_ids, key=lambda i: order[i]), offsets):
            row[op_id] = row[agg_id] + offset
    # Rare mixed columns (an aggregation beside another cell's ops): push overlapping nodes apart.
    for col in set(column.values()):
        members = sorted((n.id for n in nodes if column[n.id] == col), key=lambda i: (row[i], order[i]))
        for previous, current in zip(members, members[1:]):
            if row[current] < row[previous] + 1.0:
                row[current] = row[previous] + 1.0
    return row


def _layout(nodes: Sequence[Node], edges: Sequence[Edge]) -> tuple[dict[str, int], dict[str, float]]:
    """(column, row) per node: the fixed positions when every node has one, else the layered layout."""
    if all(n.at is not None for n in nodes):
        return ({n.id: n.at[0] for n in nodes}, {n.id: n.at[1] for n in nodes})  # type: ignore[index]
    column = _columns(nodes, edges)
    return column, _rows(nodes, edges, column)


def _draw_panel(fig: Any, ax: Any, nodes: list[Node], edges: list[Edge], caption: str) -> None:
    from matplotlib.patches import FancyArrowPatch

    column, row = _layout(nodes, edges)
    xs = [column[n.id] for n in nodes]
    ys = [row[n.id] for n in nodes]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(max(ys) + 0.7, min(ys) - 0.7)  # row 0 at the top
    ax.axis("off")
    ax.set_title(caption, fontsize=10, loc="left")
    texts = {}
    for node in nodes:
        unused = node.kind == "unused"
        texts[node.id] = ax.text(
            column[node.id], row[node.id], node.label, ha="center", va="center", zorder=3,
            fontsize=8.5, color="#777777" if unused else "black",
            fontweight="bold" if node.kind in ("input", "output") else "normal",
            bbox=dict(boxstyle="round,pad=0.35" if node.kind != "agg" else "round4,pad=0.4",
                      facecolor=node.colour, edgecolor="#999999" if unused else "#444444",
                      linestyle="--" if unused or node.op == "skip" else "-", linewidth=0.9),
        )
    # Sizes of the node boxes, in data units, for clipping the arrows (the layout is fixed from here on).
    renderer = fig.canvas.get_renderer()
    inverse = ax.transData.inverted()
    half: dict[str, tuple[float, float]] = {}
    for node_id, text in texts.items():
        text.update_bbox_position_size(renderer)
        box = text.get_bbox_patch().get_window_extent(renderer)
        (x0, y0), (x1, y1) = inverse.transform([(box.x0, box.y0), (box.x1, box.y1)])
        half[node_id] = (abs(x1 - x0) / 2, abs(y1 - y0) / 2)

    def clip(node_id: str, towards: tuple[float, float]) -> tuple[float, float]:
        cx, cy = column[node_id], row[node_id]
        dx, dy = towards[0] - cx, towards[1] - cy
        hw, hh = half[node_id]
        scale = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
        scale = min(scale * 1.04, 1.0)
        return cx + dx * scale, cy + dy * scale

    for edge in edges:
        if edge.src not in texts or edge.dst not in texts:
            continue
        src = (column[edge.src], row[edge.src])
        dst = (column[edge.dst], row[edge.dst])
        span = abs(dst[0] - src[0])
        rad = 0.0 if span <= 1 else (0.18 if dst[1] >= src[1] else -0.18)
        if span == 0:
            rad = 0.0
        dashed = edge.style == "dashed"
        ax.add_patch(FancyArrowPatch(
            clip(edge.src, dst), clip(edge.dst, src), arrowstyle="-|>", mutation_scale=9,
            connectionstyle=f"arc3,rad={rad}", color="#888888" if dashed else "#333333",
            linestyle="--" if dashed else "-", linewidth=0.9, zorder=1, shrinkA=0, shrinkB=0,
        ))
        if edge.label and not dashed:
            ax.text((src[0] + dst[0]) / 2 + (0.08 if span == 0 else 0), (src[1] + dst[1]) / 2, edge.label,
                    fontsize=7, color="#555555", ha="left" if span == 0 else "center", va="center", zorder=2,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))


def _render_with_matplotlib(graph: ArchGraph) -> bytes:
    import io

    from matplotlib.patches import Patch

    from nasfcos.analysis.plots import DPI, new_figure

    groups = graph.groups()
    panels = []
    for group in groups:
        nodes = [n for n in graph.nodes if n.group == group]
        ids = {n.id for n in nodes}
        edges = [e for e in graph.edges if e.src in ids and e.dst in ids]
        column, rows = _layout(nodes, edges)
        span = max(rows.values()) - min(rows.values()) + 1
        panels.append((group, nodes, edges, max(column.values()) + 1, span))
    width = max(8.0, 1.45 * max(p[3] for p in panels) + 0.8)
    captions = [textwrap.fill(graph.captions.get(p[0], p[0]), width=int(width * 11)) for p in panels]
    # Panel height: its rows plus its caption lines (the gridspec gap is 0.3 of the mean panel height).
    heights = [max(1.1, 0.5 * p[4] + 0.5) + 0.2 * (c.count("\n") + 1) for p, c in zip(panels, captions)]
    top_margin = 0.75 if graph.title else 0.35
    total = sum(heights) * (1 + 0.3 * (len(panels) - 1) / len(panels)) + top_margin + 0.65
    fig = new_figure(figsize=(width, total), dpi=DPI)
    grid = fig.add_gridspec(len(panels), 1, height_ratios=heights, hspace=0.3,
                            top=1 - top_margin / total, bottom=0.6 / total, left=0.02, right=0.98)
    for k, ((group, nodes, edges, _, _), caption) in enumerate(zip(panels, captions)):
        ax = fig.add_subplot(grid[k])
        _draw_panel(fig, ax, nodes, edges, caption)
    if graph.title:
        fig.suptitle(graph.title, fontsize=12, y=1 - 0.12 / total, va="top")
    handles = [Patch(facecolor=colour, edgecolor="#444444", label=label) for label, colour in _LEGEND]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def render_arch(
    genotype: Genotype | ArchGraph,
    out_png: str | Path,
    *,
    title: str = "",
    engine: str = "auto",
) -> ArchRender:
    """Draw ``genotype`` to ``out_png`` and save its DOT text next to it (same name, ``.dot``).

    ``engine``: ``"auto"`` (Graphviz ``dot`` when installed, else matplotlib), ``"dot"`` (``FileNotFoundError``
    without it) or ``"matplotlib"``. If ``dot`` is installed but fails, the matplotlib drawing is used and
    :attr:`ArchRender.note` says why.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (got {engine!r})")
    graph = genotype if isinstance(genotype, ArchGraph) else build_graph(genotype, title=title)
    out_png = Path(out_png)
    dot_text = to_dot(graph)
    dot_path = atomic_write_text(out_png.with_suffix(".dot"), dot_text)
    dot_binary = find_dot() if engine in ("auto", "dot") else None
    if engine == "dot" and dot_binary is None:
        raise FileNotFoundError("Graphviz 'dot' is not on PATH")
    note = ""
    if dot_binary is not None:
        try:
            png = _render_with_dot(dot_binary, dot_text)
            return ArchRender(atomic_write_bytes(out_png, png), dot_path, dot_text, "dot")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            if engine == "dot":
                raise
            note = f"Graphviz could not draw it ({exc}); drawn with matplotlib instead"
    png = _render_with_matplotlib(graph)
    return ArchRender(atomic_write_bytes(out_png, png), dot_path, dot_text, "matplotlib", note)


# ----------------------------------------------------------------------------------------------------------
# Markdown table
# ----------------------------------------------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fpn_table(cells: tuple[FPNCell, ...]) -> str:
    outputs = fpn_outputs(cells)
    strides = fpn_pool_strides(cells)
    role = {outputs.p3: "P3", outputs.p4: "P4", outputs.p5: "P5"}
    for index in outputs.dangling:
        role[index] = "dangling (added to P3, P4, P5)"
    rows = []
    for t, cell in enumerate(cells):
        index = NUM_BACKBONE_FEATURES + t
        readers = [fpn_pool_label(NUM_BACKBONE_FEATURES + u) for u, later in enumerate(cells)
                   if index in (later.in1, later.in2)]
        used = role.get(index) or "input of " + ", ".join(readers)
        rows.append([t + 1, fpn_pool_label(index), strides[index], fpn_pool_label(cell.in1), cell.op1,
                     fpn_pool_label(cell.in2), cell.op2, cell.agg, used])
    table = _md_table(["cell", "output", "stride", "input 1", "op 1", "input 2", "op 2", "aggregation", "used as"],
                      rows)
    extra = "".join(f" + {fpn_pool_label(i)}" for i in outputs.dangling)
    summary = (f"P5 = {fpn_pool_label(outputs.p5)}{extra}, P4 = {fpn_pool_label(outputs.p4)}{extra}, "
               f"P3 = {fpn_pool_label(outputs.p3)}{extra} (each resized to its stride); "
               "P6 and P7 come from P5 by stride-2 3x3 convs.")
    return f"**FPN** ({len(cells)} searched cells; C2..C5 are the backbone features)\n\n{table}\n\n{summary}"


def _head_table(head: SequentialHead | CellHead) -> str:
    if isinstance(head, SequentialHead):
        rows = [[i, op, _layer_sharing(head.share_from, i)] for i, op in enumerate(head.ops)]
        table = _md_table(["layer", "op", "weights across levels"], rows)
        return (f"**Head** (sequential, {len(head.ops)} layers per tower; GN + ReLU after each op but skip)\n\n"
                f"{table}\n\n{_sharing_caption(head.share_from, head.num_layers)}.")
    rows = [["op0", "h1", "h0 (p)", head.op0, "", "", "", _layer_sharing(head.share_from, 0)]]
    for t, cell in enumerate(head.cells):
        first = head_pool_size(t)
        rows.append([t + 1, f"h{first}, h{first + 1}, h{first + 2}", f"h{cell.in1}", cell.op1, f"h{cell.in2}",
                     cell.op2, cell.agg, _layer_sharing(head.share_from, t + 1)])
    table = _md_table(["cell", "writes", "input 1", "op 1", "input 2", "op 2", "aggregation",
                       "weights across levels"], rows)
    return (f"**Head** (cell head, op0 + {len(head.cells)} cells per tower; output h{head.output_index})\n\n"
            f"{table}\n\n{_sharing_caption(head.share_from, head.num_layers)}.")


def genotype_table_md(genotype: Genotype) -> str:
    """Markdown tables of the FPN cells (inputs, ops, aggregation, stride, role) and of the head."""
    if isinstance(genotype.fpn, PlainFPN):
        fpn = (f"**FPN**: hand-designed (lateral 1x1 on C3..C5, top-down sums, {genotype.fpn.conv} outputs; "
               "P6 and P7 from P5 by stride-2 3x3 convs)")
    else:
        fpn = _fpn_table(genotype.fpn)
    return f"{fpn}\n\n{_head_table(genotype.head)}\n"
