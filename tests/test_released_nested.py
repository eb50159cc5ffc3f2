"""The authors' nested spelling of the released genotype is read everywhere a genotype is read (API, JSON text,
genotype files, ``--arch``), round-trips, decodes to the same architecture as the flat spelling, and a
malformed literal stays a one-line error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nasfcos.cli import main
from nasfcos.errors import UserError
from nasfcos.space import Genotype, released_literal
from nasfcos.space.genotype import FPNCell, SequentialHead
from nasfcos.space.presets import PRESETS, load_genotype_file, resolve_arch, resolve_preset

# Typed in by hand from ../shared/reference/FACTS.md section 3 (the authors' configs' `CONFIG:` value).
NESTED = [[[3, 3, 4, 4, 1]], [[3, 3, 4, 4, 1]], [[4, 3, 4, 3, 1]], [[1, 3, 4, 3, 1]], [[5, 3, 4, 4, 1]],
          [[4, 7, 4, 4, 1]], [[7, 2, 4, 4, 1]], [0], [5, 1, 5, 0, 4, 4]]
FLAT = [[3, 3, 4, 4, 1], [3, 3, 4, 4, 1], [4, 3, 4, 3, 1], [1, 3, 4, 3, 1], [5, 3, 4, 4, 1], [4, 7, 4, 4, 1],
        [7, 2, 4, 4, 1], 0, [5, 1, 5, 0, 4, 4]]
# FACTS 3 decoded by hand: ops 4 = dcn3x3, 3 = skip; agg 1 = concat; head ops 5 1 5 0 4 4; all layers shared.
DCN, SKIP = "dcn3x3", "skip"
EXPECTED = Genotype(
    fpn=(FPNCell(3, 3, DCN, DCN, "concat"), FPNCell(3, 3, DCN, DCN, "concat"), FPNCell(4, 3, DCN, SKIP, "concat"),
         FPNCell(1, 3, DCN, SKIP, "concat"), FPNCell(5, 3, DCN, DCN, "concat"), FPNCell(4, 7, DCN, DCN, "concat"),
         FPNCell(7, 2, DCN, DCN, "concat")),
    head=SequentialHead(ops=("dcn3x3", "conv3x3", "dcn3x3", "conv1x1", "skip", "skip"), share_from=(0,) * 5),
)


def test_nested_and_flat_decode_to_the_facts_architecture() -> None:
    assert Genotype.from_released(NESTED) == EXPECTED
    assert Genotype.from_released(FLAT) == EXPECTED
    assert PRESETS["nas-fcos"].genotype == EXPECTED


def test_both_spellings_round_trip() -> None:
    g = Genotype.from_released(NESTED)
    assert g.to_released() == FLAT
    assert g.to_released(nested=True) == NESTED
    assert Genotype.from_released(g.to_released(nested=True)) == g
    assert Genotype.from_released(g.to_released()) == g
    assert released_literal(nested=True) == NESTED and released_literal() == FLAT
    assert Genotype.from_json(json.dumps(NESTED)) == g  # JSON text
    assert Genotype.from_released(tuple(tuple(x) if isinstance(x, list) else x for x in NESTED)) == g


def test_a_searched_genotype_round_trips_nested() -> None:
    """Not only the released one: 5 cells (F6, F7, F8 unread), sum aggregations, share index 3."""
    flat = [[0, 1, 0, 1, 0], [2, 3, 2, 3, 0], [3, 1, 4, 0, 1], [3, 2, 1, 1, 1], [4, 5, 3, 3, 0], 3, [1, 1, 2, 3]]
    nested = [[cell] for cell in flat[:5]] + [[3], [1, 1, 2, 3]]
    g = Genotype.from_released(flat)
    assert Genotype.from_released(nested) == g
    assert g.to_released(nested=True) == nested
    assert g.head.share_from == (3,) * 5


@pytest.mark.parametrize("spelling", [NESTED, FLAT, {"genotype": NESTED}])
def test_genotype_files_and_inline_arch_accept_both(tmp_path: Path, spelling: object) -> None:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(spelling))
    assert load_genotype_file(path) == EXPECTED
    assert resolve_arch(str(path)) == EXPECTED
    if isinstance(spelling, list):
        text = json.dumps(spelling)
        assert resolve_arch(text) == EXPECTED
        assert resolve_preset(text).genotype == EXPECTED


def profile_counts(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """Exact parameter and MAC counts `nasfcos profile` writes for ``--arch ...`` (``--json``)."""
    out = tmp_path / "profile.json"
    capsys.readouterr()
    assert main(["profile", "--backbone", "resnet18", "--size", "64x64", "--num-classes", "6",
                 "--fpn-width", "32", "--head-width", "32", "--json", str(out), *argv]) == 0
    data = json.loads(out.read_text())
    return {part: (data[part]["params"], data[part]["macs"]) for part in ("whole", "decoder")}


def test_cli_arch_accepts_the_pasted_nested_literal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--arch '<literal>'` and `--arch file.json` profile to exactly the preset's counts."""
    path = tmp_path / "nested.json"
    path.write_text(json.dumps(NESTED))
    preset = profile_counts(["--arch", "nas-fcos"], tmp_path, capsys)
    assert preset != profile_counts(["--arch", "fpn-fcos"], tmp_path, capsys)  # the counts tell decoders apart
    assert profile_counts(["--arch", json.dumps(NESTED)], tmp_path, capsys) == preset
    assert profile_counts(["--arch", str(path)], tmp_path, capsys) == preset
    assert profile_counts(["--arch", json.dumps(FLAT)], tmp_path, capsys) == preset


BAD = [
    # (mutation of the nested literal, message pattern)
    (lambda r: r.__setitem__(0, [[3, 3, 4, 4, 1], [3, 3, 4, 4, 1]]), r"released genotype\[0\]: expected an FPN cell"),
    (lambda r: r.__setitem__(2, [[4, 3, 4, 3]]), r"released genotype\[2\]\[0\]: expected an FPN cell"),
    (lambda r: r.__setitem__(2, [[4, 3, 4, 9, 1]]), r"released genotype\[2\]\[0\]\[3\] \(op2\): FPN op id 9 out of range"),
    (lambda r: r.__setitem__(3, [[1, 8, 4, 3, 1]]), r"released genotype\[3\]\[0\]\[1\] \(id2\): index 8 out of range 0\.\.6"),
    (lambda r: r.__setitem__(1, [[[3, 3, 4, 4, 1]]]), r"released genotype\[1\]\[0\]: expected an FPN cell"),
    (lambda r: r.__setitem__(7, [0, 1]), r"released genotype\[7\] \(head share index\): expected an integer or a one"),
    (lambda r: r.__setitem__(7, []), r"released genotype\[7\] \(head share index\): expected an integer"),
    (lambda r: r.__setitem__(7, [9]), r"released genotype\[7\] \(head share index\): 9 out of range 0\.\.6"),
    (lambda r: r.__setitem__(8, [[5, 1, 5, 0, 4, 4]]), r"released genotype\[8\] \(head ops\)\[0\]: expected an integer"),
]


@pytest.mark.parametrize(("mutate", "pattern"), BAD)
def test_malformed_nested_literals_are_one_line_errors(mutate, pattern: str) -> None:
    data = json.loads(json.dumps(NESTED))
    mutate(data)
    with pytest.raises(UserError, match=pattern) as info:
        Genotype.from_released(data)
    assert "\n" not in str(info.value)


def test_malformed_inline_arch_on_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(json.dumps(NESTED))
    data[2] = [[4, 3, 4, 9, 1]]
    capsys.readouterr()
    assert main(["profile", "--arch", json.dumps(data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"--arch|arch", lines[0]) and "op2" in lines[0], lines
