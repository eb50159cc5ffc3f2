"""PRESETS, get_preset (width variants) and resolve_arch (name | JSON file | Genotype)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import nasfcos
from nasfcos.errors import UserError
from nasfcos.space import (
    PRESETS,
    FPNCell,
    Genotype,
    PlainFPN,
    Preset,
    SearchSpace,
    SequentialHead,
    get_preset,
    resolve_arch,
    resolve_preset,
)

RELEASED = [
    [3, 3, 4, 4, 1], [3, 3, 4, 4, 1], [4, 3, 4, 3, 1], [1, 3, 4, 3, 1], [5, 3, 4, 4, 1], [4, 7, 4, 4, 1],
    [7, 2, 4, 4, 1], 0, [5, 1, 5, 0, 4, 4],
]
PLAIN_HEAD = SequentialHead(("conv3x3",) * 4, (0,) * 5)


def test_preset_names_and_public_access() -> None:
    assert {"nas-fcos", "nas-fcos-fpn", "fpn-fcos", "deformable-fpn-fcos"} <= set(PRESETS)
    assert nasfcos.PRESETS is PRESETS
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset)
        preset.genotype.validate()
        assert preset.description
        assert preset.concat in ("grouped", "dense")


def test_nas_fcos_is_the_released_architecture() -> None:
    preset = PRESETS["nas-fcos"]
    assert preset.genotype == Genotype.from_released(RELEASED)
    assert preset.genotype.to_released() == RELEASED
    assert preset.genotype.head == SequentialHead(
        ("dcn3x3", "conv3x3", "dcn3x3", "conv1x1", "skip", "skip"), (0, 0, 0, 0, 0)
    )
    assert (preset.fpn_width, preset.head_width, preset.concat) == (256, 256, "grouped")
    assert all(cell.agg == "concat" for cell in preset.genotype.fpn)
    assert SearchSpace().contains(preset.genotype)


def test_baseline_presets() -> None:
    assert PRESETS["nas-fcos-fpn"].genotype == Genotype(Genotype.from_released(RELEASED).fpn, PLAIN_HEAD)
    assert PRESETS["fpn-fcos"].genotype == Genotype(PlainFPN("conv3x3"), PLAIN_HEAD)
    assert PRESETS["deformable-fpn-fcos"].genotype == Genotype(
        PlainFPN("dcn3x3"), SequentialHead(("dcn3x3",) * 4, (0,) * 5)
    )
    assert len({p.genotype.key() for p in PRESETS.values()}) == len(PRESETS)


def test_width_variants() -> None:
    assert get_preset("nas-fcos") is PRESETS["nas-fcos"]
    v128 = get_preset("nas-fcos@128")
    assert (v128.fpn_width, v128.head_width) == (128, 128)
    assert v128.genotype == PRESETS["nas-fcos"].genotype
    v = get_preset("nas-fcos@128-256")
    assert (v.fpn_width, v.head_width) == (128, 256)
    assert get_preset("fpn-fcos@64").fpn_width == 64
    assert resolve_arch("nas-fcos@128-256") == PRESETS["nas-fcos"].genotype
    assert resolve_preset("nas-fcos@128-256") == v


def test_unknown_preset_lists_the_valid_names() -> None:
    for bad in ("nas_fcos", "retinanet@256", "nas-fcos@", 7):
        with pytest.raises(UserError, match=r"unknown preset .*nas-fcos, nas-fcos-fpn, fpn-fcos, deformable-fpn-fcos"):
            get_preset(bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"^arch: widths in 'nas-fcos@0' must be positive"):
        get_preset("nas-fcos@0")


def test_resolve_arch_accepts_names_genotypes_presets_and_files(tmp_path: Path) -> None:
    g = PRESETS["nas-fcos-fpn"].genotype
    assert resolve_arch("nas-fcos-fpn") == g
    assert resolve_arch(g) is g
    assert resolve_arch(PRESETS["fpn-fcos"]) == PRESETS["fpn-fcos"].genotype
    path = tmp_path / "arch.json"
    path.write_text(g.to_json(), encoding="utf-8")
    assert resolve_arch(path) == g
    assert resolve_arch(str(path)) == g
    released = tmp_path / "released.json"
    released.write_text(json.dumps(RELEASED), encoding="utf-8")
    assert resolve_arch(released) == PRESETS["nas-fcos"].genotype
    wrapped = tmp_path / "best.json"
    wrapped.write_text(json.dumps({"genotype": g.to_dict(), "reward": -1.5}), encoding="utf-8")
    assert resolve_arch(wrapped) == g
    custom = resolve_preset(path)
    assert custom.genotype == g and (custom.fpn_width, custom.head_width, custom.concat) == (256, 256, "grouped")


def test_resolve_arch_errors_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^arch: unknown preset \(got 'nasfcos'\)"):
        resolve_arch("nasfcos")
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=r"nope\.json: genotype JSON file not found"):
        resolve_arch(str(missing))
    with pytest.raises(UserError, match=r"nope\.json: genotype JSON file not found"):
        resolve_arch(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{\"fpn\": [", encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.json: malformed JSON at line 1"):
        resolve_arch(broken)
    bad = tmp_path / "bad.json"
    data = PRESETS["nas-fcos"].genotype.to_dict()
    data["fpn"][3]["in2"] = 9
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json: genotype\.fpn\[3\]\.in2: index 9 out of range 0\.\.6") as info:
        resolve_arch(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"^arch: expected a preset name, a genotype JSON path or a Genotype"):
        resolve_arch(42)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"only 2 unconsumed"):
        resolve_arch(Genotype((FPNCell(3, 3, "skip", "skip", "sum"),) * 2, PLAIN_HEAD))


def test_public_names_resolve_lazily() -> None:
    assert nasfcos.Genotype is Genotype
    assert nasfcos.SearchSpace is SearchSpace
