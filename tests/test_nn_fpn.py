"""nn/fpn.py: the searched FPN's output rule and dependencies, the plain FCOS FPN, P6/P7."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nasfcos.errors import UserError
from nasfcos.nn.fpn import PlainFPN, SearchedFPN
from nasfcos.space.genotype import FPNCell

W = 16
IN_CHANNELS = {"c2": 8, "c3": 12, "c4": 20, "c5": 24}
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The released genotype (FACTS 3): pool 0..3 = C2..C5.
NAS_FCOS_CELLS = tuple(
    FPNCell(a, b, o1, o2, "concat")
    for a, b, o1, o2 in [
        (3, 3, "dcn3x3", "dcn3x3"),
        (3, 3, "dcn3x3", "dcn3x3"),
        (4, 3, "dcn3x3", "skip"),
        (1, 3, "dcn3x3", "skip"),
        (5, 3, "dcn3x3", "dcn3x3"),
        (4, 7, "dcn3x3", "dcn3x3"),
        (7, 2, "dcn3x3", "dcn3x3"),
    ]
)


def features(height: int = 128, width: int = 96, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random backbone features with the sizes a stride-s backbone gives (ceil division)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, math.ceil(height / STRIDES[k]), math.ceil(width / STRIDES[k]), generator=g)
        for k, c in IN_CHANNELS.items()
    }


def perturbed(feats: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    out = dict(feats)
    out[key] = feats[key] + torch.randn_like(feats[key])
    return out


def changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[bool]:
    return [not torch.allclose(x, y) for x, y in zip(a, b)]


def level_shapes(feats: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    h, w = feats["c5"].shape[-2:]
    h6, w6 = (h + 1) // 2, (w + 1) // 2
    return [tuple(feats[k].shape[-2:]) for k in ("c3", "c4", "c5")] + [(h6, w6), ((h6 + 1) // 2, (w6 + 1) // 2)]


@pytest.mark.parametrize("size", [(128, 96), (128, 128), (100, 76)])
def test_searched_fpn_shapes_any_input_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    fpn = SearchedFPN(NAS_FCOS_CELLS, IN_CHANNELS, W).eval()
    feats = features(*size)
    outs = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in outs] == level_shapes(feats)
    assert all(p.shape[:2] == (2, W) for p in outs)


def test_released_genotype_output_rule_and_no_unused_parameters() -> None:
    torch.manual_seed(0)
    fpn = SearchedFPN(NAS_FCOS_CELLS, {k: v for k, v in IN_CHANNELS.items() if k != "c2"}, W)
    # FACTS 3: unconsumed F6, F8, F9, F10 -> P5 = F8, P4 = F9, P3 = F10, dangling F6; C2 is never read.
    assert (fpn.p5_index, fpn.p4_index, fpn.p3_index, fpn.dangling) == (8, 9, 10, (6,))
    assert set(fpn.inputs) == {"c3", "c4", "c5"}
    outs = fpn(features())
    sum(p.square().mean() for p in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn.parameters())


def test_fpn_reading_only_c5_ignores_c2_c3_c4() -> None:
    torch.manual_seed(0)
    cells = (
        FPNCell(3, 3, "sep3x3", "skip", "sum"),  # F4, consumed by F5
        FPNCell(4, 3, "skip", "sep3x3_d3", "concat"),  # F5 -> P5
        FPNCell(3, 3, "sep5x5_d6", "dcn3x3", "sum"),  # F6 -> P4
        FPNCell(3, 3, "skip", "sep3x3", "concat"),  # F7 -> P3
    )
    fpn = SearchedFPN(cells, {"c5": IN_CHANNELS["c5"]}, W).eval()
    assert set(fpn.inputs) == {"c5"} and (fpn.p5_index, fpn.p4_index, fpn.p3_index) == (5, 6, 7)
    feats = features()
    base = fpn(feats)
    for key in ("c2", "c3", "c4"):
        assert changed(base, fpn(perturbed(feats, key))) == [False] * 5
    assert changed(base, fpn(perturbed(feats, "c5"))) == [True] * 5
    assert [tuple(p.shape[-2:]) for p in base] == level_shapes(feats)


def test_dangling_output_is_added_to_every_level_eq1() -> None:
    torch.manual_seed(0)
    cells = (
        FPNCell(1, 1, "sep3x3", "skip", "sum"),  # F4 at stride 8: dangling
        FPNCell(2, 2, "skip", "sep3x3", "sum"),  # F5 at stride 16: P5
        FPNCell(3, 3, "sep3x3", "sep3x3", "concat"),  # F6 at stride 32: P4
        FPNCell(3, 3, "skip", "sep3x3_d3", "sum"),  # F7 at stride 32: P3
    )
    fpn = SearchedFPN(cells, IN_CHANNELS, W).eval()
    assert (fpn.p5_index, fpn.p4_index, fpn.p3_index, fpn.dangling) == (5, 6, 7, (4,))
    feats = features()
    base = fpn(feats)
    # Dependencies: C3 reaches every level through F4; C4 only P5 (and P6, P7 built on it); C5 only P3 and P4.
    assert changed(base, fpn(perturbed(feats, "c3"))) == [True] * 5
    assert changed(base, fpn(perturbed(feats, "c4"))) == [False, False, True, True, True]
    assert changed(base, fpn(perturbed(feats, "c5"))) == [True, True, False, False, False]
    assert changed(base, fpn(perturbed(feats, "c2"))) == [False] * 5

    # Exact formula: P_i = resize_to_C_i(upsample-the-smaller(F_i) + F4), P6 = conv(P5), P7 = conv(relu(P6)).
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        fpn.cells[str(i)].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i in (4, 5, 6, 7)
    ]
    p3, p4, p5, p6, p7 = fpn(feats)
    for h in hooks:
        h.remove()

    def bilinear(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    f4 = captured[4]
    assert tuple(f4.shape[-2:]) == tuple(feats["c3"].shape[-2:])
    for p, index, key in ((p3, 7, "c3"), (p4, 6, "c4"), (p5, 5, "c5")):
        expected = bilinear(bilinear(captured[index], f4.shape[-2:]) + f4, feats[key].shape[-2:])
        assert torch.allclose(p, expected, atol=1e-6)
    top = fpn.top
    assert torch.allclose(p6, F.conv2d(p5, top.p6.weight, top.p6.bias, stride=2, padding=1), atol=1e-6)
    assert torch.allclose(p7, F.conv2d(F.relu(p6), top.p7.weight, top.p7.bias, stride=2, padding=1), atol=1e-6)


def test_searched_fpn_rejects_too_few_outputs_and_missing_inputs() -> None:
    chain = tuple(FPNCell(a, b, "skip", "skip", "sum") for a, b in ((3, 3), (4, 4), (5, 3)))
    with pytest.raises(UserError, match="unconsumed"):
        SearchedFPN(chain, IN_CHANNELS, W)
    with pytest.raises(UserError, match="in_channels.*c3"):
        SearchedFPN(NAS_FCOS_CELLS, {"c4": 8, "c5": 8}, W)


def test_fpn_init_follows_fcos() -> None:
    torch.manual_seed(0)
    fpn = SearchedFPN(NAS_FCOS_CELLS, IN_CHANNELS, 64)
    bound = math.sqrt(3.0 / (64 * 9))  # kaiming_uniform(a=1): gain 1, bound sqrt(3 / fan_in)
    for conv in (fpn.top.p6, fpn.top.p7):
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.95 * bound
        assert torch.count_nonzero(conv.bias) == 0
    dcn = fpn.cells["4"].op1.conv
    assert torch.count_nonzero(dcn.offset_mask.weight) == 0 and torch.count_nonzero(dcn.bias) == 0


def plain_fpn_params(in_channels: dict[str, int], width: int, dcn: bool) -> int:
    lateral = sum(in_channels[k] * width + width for k in ("c3", "c4", "c5"))
    out = 9 * width * width + width
    if dcn:
        out += 54 * width * 9 + 54  # offset/mask conv: 2 groups x 3 x 9 channels
    top = 2 * (9 * width * width + width)
    return lateral + 3 * out + top


@pytest.mark.parametrize("conv", ["conv3x3", "dcn3x3"])
def test_plain_fpn_shapes_and_parameter_count(conv: str) -> None:
    torch.manual_seed(0)
    fpn = PlainFPN(IN_CHANNELS, W, conv=conv)
    assert sum(p.numel() for p in fpn.parameters()) == plain_fpn_params(IN_CHANNELS, W, conv == "dcn3x3")
    feats = features(128, 128)
    outs = fpn(feats)
    assert [tuple(p.shape[-2:]) for p in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    feats = features(100, 76)
    assert [tuple(p.shape[-2:]) for p in fpn(feats)] == level_shapes(feats)


def test_plain_fpn_top_down_dependencies_and_p6_from_p5_output() -> None:
    torch.manual_seed(0)
    fpn = PlainFPN(IN_CHANNELS, W)
    feats = features()
    base = fpn(feats)
    assert changed(base, fpn(perturbed(feats, "c3"))) == [True, False, False, False, False]
    assert changed(base, fpn(perturbed(feats, "c4"))) == [True, True, False, False, False]
    assert changed(base, fpn(perturbed(feats, "c5"))) == [True] * 5
    assert changed(base, fpn(perturbed(feats, "c2"))) == [False] * 5
    p5, p6 = base[2], base[3]
    assert torch.allclose(p6, F.conv2d(p5, fpn.top.p6.weight, fpn.top.p6.bias, stride=2, padding=1), atol=1e-6)
    # Top-down: P4 = out4(lat4(C4) + nearest_up(lat5(C5))).
    inner5 = fpn.lateral["c5"](feats["c5"])
    inner4 = fpn.lateral["c4"](feats["c4"]) + F.interpolate(inner5, size=feats["c4"].shape[-2:], mode="nearest")
    assert torch.allclose(base[1], fpn.output["c4"](inner4), atol=1e-6)
    with pytest.raises(UserError, match="conv3x3, dcn3x3"):
        PlainFPN(IN_CHANNELS, W, conv="sep3x3")


@pytest.mark.parametrize("searched", [True, False])
def test_channels_last_inputs_give_the_same_pyramid(searched: bool) -> None:
    torch.manual_seed(0)
    fpn = (SearchedFPN(NAS_FCOS_CELLS, IN_CHANNELS, W) if searched else PlainFPN(IN_CHANNELS, W)).eval()
    feats = features()
    expected = fpn(feats)
    got = fpn({k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()})
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got))
