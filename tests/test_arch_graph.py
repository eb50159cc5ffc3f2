"""Drawing a genotype (paper Fig. 4): graph structure, DOT text, both renderers, and the markdown table."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nasfcos.analysis.arch_graph as arch_graph
from nasfcos.analysis.arch_graph import build_graph, find_dot, genotype_table_md, render_arch, to_dot
from nasfcos.errors import UserError
from nasfcos.space.genotype import FPNCell, Genotype, SequentialHead
from nasfcos.space.presets import PRESETS
from nasfcos.space.search_space import SearchSpace

NAS_FCOS = PRESETS["nas-fcos"].genotype

# The released FPN (FACTS 3), written out by hand: cell -> ((input, op), (input, op)), all concat.
RELEASED_CELLS = {
    "F4": (("C5", "dcn3x3"), ("C5", "dcn3x3")),
    "F5": (("C5", "dcn3x3"), ("C5", "dcn3x3")),
    "F6": (("F4", "dcn3x3"), ("C5", "skip")),
    "F7": (("C3", "dcn3x3"), ("C5", "skip")),
    "F8": (("F5", "dcn3x3"), ("C5", "dcn3x3")),
    "F9": (("F4", "dcn3x3"), ("F7", "dcn3x3")),
    "F10": (("F7", "dcn3x3"), ("C4", "dcn3x3")),
}


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300, image.size
        assert np.asarray(image.convert("L"), dtype=np.float64).var() > 0


def test_nas_fcos_graph_has_the_released_fpn() -> None:
    graph = build_graph(NAS_FCOS)
    edges = {(e.src, e.dst) for e in graph.edges}
    for cell, branches in RELEASED_CELLS.items():
        assert graph.node(cell).kind == "agg" and "concat" in graph.node(cell).label
        for k, (source, op) in enumerate(branches, start=1):
            op_node = graph.node(f"{cell}_op{k}")
            assert (op_node.kind, op_node.op, op_node.label) == ("op", op, op)
            assert (source, op_node.id) in edges and (op_node.id, cell) in edges
    # Outputs: P3 <- F10, P4 <- F9, P5 <- F8 (solid); the dangling F6 feeds all three (dashed).
    solid = {(e.src, e.dst) for e in graph.edges if e.style == "solid"}
    dashed = {(e.src, e.dst) for e in graph.edges if e.style == "dashed"}
    assert {("F10", "P3"), ("F9", "P4"), ("F8", "P5"), ("P5", "P6"), ("P6", "P7")} <= solid
    assert dashed == {("F6", "P3"), ("F6", "P4"), ("F6", "P5")}
    assert graph.node("C2").kind == "unused"  # C2 is never read by the released FPN
    # Head: the released sequential head as a chain, every layer shared (share_from 0).
    chain = ["head_in"] + [f"L{i}" for i in range(6)] + ["predictors"]
    assert all((a, b) in edges for a, b in zip(chain, chain[1:]))
    ops = [graph.node(f"L{i}").op for i in range(6)]
    assert ops == ["dcn3x3", "conv3x3", "dcn3x3", "conv1x1", "skip", "skip"]
    assert all("shared" in graph.node(f"L{i}").label for i in range(6))


def test_dot_text_for_nas_fcos() -> None:
    dot = to_dot(build_graph(NAS_FCOS, title="NAS-FCOS"))
    assert dot.startswith("digraph nasfcos {") and dot.rstrip().endswith("}")
    assert '"C5" -> "F4_op1";' in dot and '"F4_op1" -> "F4";' in dot
    assert '"F4_op1" [label="dcn3x3"' in dot
    assert '"F6_op2" [label="skip"' in dot and '"C5" -> "F6_op2";' in dot
    assert dot.count('\\nconcat  /') == 7  # seven concat aggregation nodes
    for level, cell in (("P3", "F10"), ("P4", "F9"), ("P5", "F8")):
        assert f'"{cell}" -> "{level}";' in dot
        assert f'"F6" -> "{level}" [label="+", style=dashed' in dot
    assert 'label="NAS-FCOS"' in dot and "subgraph cluster_fpn" in dot and "subgraph cluster_head" in dot
    assert dot.count("{") == dot.count("}")


def test_matplotlib_rendering_writes_png_and_dot(tmp_path: Path) -> None:
    result = render_arch(NAS_FCOS, tmp_path / "nas.png", title="NAS-FCOS", engine="matplotlib")
    assert result.engine == "matplotlib" and result.png == tmp_path / "nas.png"
    assert_png(result.png)
    assert (tmp_path / "nas.dot").read_text() == result.dot_text == to_dot(build_graph(NAS_FCOS, "NAS-FCOS"))


def test_auto_engine_without_dot_uses_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arch_graph, "find_dot", lambda: None)
    assert render_arch(NAS_FCOS, tmp_path / "a.png").engine == "matplotlib"
    with pytest.raises(FileNotFoundError):
        render_arch(NAS_FCOS, tmp_path / "b.png", engine="dot")
    with pytest.raises(ValueError):
        render_arch(NAS_FCOS, tmp_path / "c.png", engine="svg")


def test_failing_dot_falls_back_to_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    false = Path("/bin/false")
    if not false.exists():
        pytest.skip("/bin/false not available")
    monkeypatch.setattr(arch_graph, "find_dot", lambda: str(false))
    result = render_arch(PRESETS["fpn-fcos"].genotype, tmp_path / "f.png")
    assert result.engine == "matplotlib" and "dot failed" in result.note
    assert_png(result.png)


@pytest.mark.skipif(find_dot() is None, reason="Graphviz 'dot' is not installed")
def test_dot_rendering(tmp_path: Path) -> None:
    result = render_arch(NAS_FCOS, tmp_path / "nas.png", title="NAS-FCOS", engine="dot")
    assert result.engine == "dot"
    assert_png(result.png)


def test_plain_fpn_and_cell_head_graphs(tmp_path: Path) -> None:
    plain = build_graph(PRESETS["deformable-fpn-fcos"].genotype)
    edges = {(e.src, e.dst) for e in plain.edges}
    assert {("C3", "lat3"), ("lat4", "M4"), ("lat5", "M4"), ("M4", "M3"), ("out3", "P3"), ("lat5", "out5")} <= edges
    assert plain.node("out4").op == "dcn3x3"
    assert all(plain.node(f"L{i}").op == "dcn3x3" for i in range(4))

    genotype = SearchSpace(head="cell").sample(random.Random(3))
    graph = build_graph(genotype)
    head = genotype.head
    edges = {(e.src, e.dst) for e in graph.edges}
    assert (f"h{head.output_index}", "predictors") in edges
    for t, cell in enumerate(head.cells):
        first = 2 + 3 * t
        assert {(f"h{cell.in1}", f"h{first}"), (f"h{cell.in2}", f"h{first + 1}"),
                (f"h{first}", f"h{first + 2}"), (f"h{first + 1}", f"h{first + 2}")} <= edges
    # A node is drawn as unused exactly when no path leads from it to the output.
    reach = {"predictors"}
    changed = True
    while changed:
        changed = False
        for e in graph.edges:
            if e.dst in reach and e.src not in reach:
                reach.add(e.src)
                changed = True
    for node in graph.nodes:
        if node.group == "head":
            assert (node.kind == "unused") == (node.id not in reach), node.id
    assert_png(render_arch(graph, tmp_path / "cell.png", engine="matplotlib").png)


def test_genotype_table_md_for_nas_fcos() -> None:
    table = genotype_table_md(NAS_FCOS)
    assert "| 1 | F4 | 32 | C5 | dcn3x3 | C5 | dcn3x3 | concat | input of F6, F9 |" in table
    assert "| 3 | F6 | 32 | F4 | dcn3x3 | C5 | skip | concat | dangling (added to P3, P4, P5) |" in table
    assert "| 7 | F10 | 8 | F7 | dcn3x3 | C4 | dcn3x3 | concat | P3 |" in table
    assert "P5 = F8 + F6, P4 = F9 + F6, P3 = F10 + F6" in table
    assert "| 0 | dcn3x3 | shared |" in table and "| 5 | skip | shared |" in table
    assert "hand-designed" in genotype_table_md(PRESETS["fpn-fcos"].genotype)


def test_invalid_genotype_is_a_user_error() -> None:
    bad = Genotype(fpn=(FPNCell(3, 3, "dcn3x3", "dcn3x3", "concat"),) * 2,
                   head=SequentialHead(("conv3x3",), (0,) * 5))
    with pytest.raises(UserError):
        build_graph(bad)
