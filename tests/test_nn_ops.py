"""nn/ops.py: op shapes, parameter counts, receptive fields, aggregation semantics, name errors."""

from __future__ import annotations

import math

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasfcos.errors import UserError
from nasfcos.nn.ops import (
    FPN_OP_NAMES,
    HEAD_OP_NAMES,
    build_aggregation,
    build_fpn_op,
    build_head_op,
    group_norm,
    init_convs_,
)
from nasfcos.space.ops import AGGREGATIONS, CELL_HEAD_OPS, FPN_OPS, HEAD_OPS

C = 16


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tables_cover_the_space_names() -> None:
    assert set(FPN_OP_NAMES) == set(FPN_OPS)
    assert set(HEAD_OP_NAMES) == set(HEAD_OPS) | set(CELL_HEAD_OPS)
    for name in AGGREGATIONS:
        build_aggregation(name, C)


@pytest.mark.parametrize(
    "channels, groups", [(256, 32), (64, 32), (32, 32), (16, 16), (48, 24), (40, 20), (30, 30), (2, 2), (1, 1)]
)
def test_group_norm_falls_back_to_largest_divisor(channels: int, groups: int) -> None:
    gn = group_norm(channels)
    assert (gn.num_groups, gn.num_channels) == (groups, channels)


# Hand-counted parameters of each op at width C (BN and GN both have 2C affine parameters).
_DCN = 9 * C * C + C + (2 * 3 * 9) * C * 9 + 2 * 3 * 9  # main conv + bias, offset/mask conv + bias
FPN_PARAMS = {
    "sep3x3": 9 * C + C * C + 2 * C,
    "sep3x3_d3": 9 * C + C * C + 2 * C,
    "sep5x5_d6": 25 * C + C * C + 2 * C,
    "skip": 0,
    "dcn3x3": _DCN + 2 * C,
}
HEAD_PARAMS = {**FPN_PARAMS, "conv1x1": C * C + C + 2 * C, "conv3x3": 9 * C * C + C + 2 * C}


OP_CASES = [("fpn", name, build_fpn_op, FPN_PARAMS, nn.BatchNorm2d) for name in FPN_OP_NAMES] + [
    ("head", name, build_head_op, HEAD_PARAMS, nn.GroupNorm) for name in HEAD_OP_NAMES]


@pytest.mark.parametrize(("part", "name", "build", "params", "norm"), OP_CASES, ids=[f"{c[0]}-{c[1]}" for c in OP_CASES])
def test_op_shape_params_and_norm(part: str, name: str, build: Any, params: dict[str, int], norm: type) -> None:
    """FPN ops keep the shape, have the hand-counted parameters and one BatchNorm; head ops the same with
    one GroupNorm; ``skip`` has neither."""
    torch.manual_seed(0)
    op = build(name, C)
    x = torch.randn(2, C, 13, 9) if part == "fpn" else torch.randn(2, C, 11, 7)
    assert op(x).shape == x.shape
    assert n_params(op) == params[name]
    norms = [m for m in op.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert all(isinstance(m, norm) for m in norms) and len(norms) == (0 if name == "skip" else 1)


def test_head_skip_is_plain_identity() -> None:
    # Documented choice: no GN + ReLU after skip, so negative values pass through unchanged.
    x = torch.randn(1, C, 5, 5)
    assert torch.equal(build_head_op("skip", C)(x), x)
    assert torch.equal(build_fpn_op("skip", C)(x), x)


@pytest.mark.parametrize("name, k, dilation", [("sep3x3", 3, 1), ("sep3x3_d3", 3, 3), ("sep5x5_d6", 5, 6)])
def test_separable_receptive_field_is_the_dilated_taps(name: str, k: int, dilation: int) -> None:
    op = build_fpn_op(name, C).eval()
    with torch.no_grad():  # positive weights: every tap contributes, ReLU keeps everything
        for conv in (op.depthwise, op.pointwise):
            conv.weight.copy_(conv.weight.abs() + 0.05)
    size, centre = 31, 15
    x = torch.zeros(1, C, size, size)
    x[0, :, centre, centre] = 1.0
    with torch.no_grad():
        support = op(x).abs().sum(1)[0] > 0
    expected = torch.zeros(size, size, dtype=torch.bool)
    r = (k - 1) // 2
    for i in range(-r, r + 1):
        for j in range(-r, r + 1):
            expected[centre + dilation * i, centre + dilation * j] = True
    assert torch.equal(support, expected)
    assert op.depthwise.groups == C and op.depthwise.bias is None and op.pointwise.bias is None


def test_dcn_op_starts_as_half_a_plain_conv() -> None:
    # Zero-initialised offsets and mask logits: sigmoid(0) = 0.5 on the regular 3x3 grid.
    torch.manual_seed(0)
    op = build_fpn_op("dcn3x3", C).eval()
    x = torch.randn(2, C, 9, 10)
    conv = op.conv
    expected = 0.5 * F.conv2d(x, conv.weight, None, padding=1) + conv.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        got = conv(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert conv.deformable_groups == 2


def test_init_convs_keeps_deformable_offsets_zero() -> None:
    torch.manual_seed(0)
    op = build_head_op("dcn3x3", 64)
    init_convs_(op, "normal")
    assert torch.count_nonzero(op.conv.offset_mask.weight) == 0
    assert torch.count_nonzero(op.conv.bias) == 0
    assert abs(op.conv.weight.std().item() - 0.01) < 0.001
    op = build_fpn_op("sep3x3", 64)
    init_convs_(op, "kaiming_uniform")
    bound = math.sqrt(3.0 / 64)  # gain 1 for a=1; fan_in of the 1x1 pointwise conv
    assert op.pointwise.weight.abs().max().item() <= bound
    assert op.pointwise.weight.abs().max().item() > 0.9 * bound


def test_unknown_names_raise_user_error_listing_allowed() -> None:
    with pytest.raises(UserError, match="sep3x3, sep3x3_d3, sep5x5_d6, skip, dcn3x3"):
        build_fpn_op("conv3x3", C)  # a head-only op is not an FPN op
    with pytest.raises(UserError, match="conv1x1"):
        build_head_op("avgpool", C)
    with pytest.raises(UserError, match="sum, concat"):
        build_aggregation("max", C)
    with pytest.raises(UserError, match="grouped, dense"):
        build_aggregation("concat", C, concat="sparse")


def test_sum_aggregation_starts_at_plain_sum_and_is_per_channel() -> None:
    torch.manual_seed(0)
    agg = build_aggregation("sum", C)
    assert n_params(agg) == 2 * C
    assert all(torch.equal(p, torch.ones_like(p)) for p in agg.parameters())
    x, y = torch.randn(2, C, 6, 6), torch.randn(2, C, 6, 6)
    assert torch.allclose(agg(x, y), x + y)
    with torch.no_grad():
        agg.weight1[0, 3] = 2.0
    diff = (agg(x, y) - (x + y)).abs().sum(dim=(0, 2, 3))
    assert diff[3] > 0 and diff.sum() == diff[3]


def test_aggregations_upsample_the_smaller_input_bilinearly() -> None:
    torch.manual_seed(0)
    agg = build_aggregation("sum", C)
    big, small = torch.randn(1, C, 8, 6), torch.randn(1, C, 4, 3)
    up = F.interpolate(small, size=(8, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(agg(big, small), big + up)
    assert torch.allclose(agg(small, big), up + big)
    concat = build_aggregation("concat", C).eval()
    assert concat(small, big).shape == (1, C, 8, 6)
    assert torch.allclose(concat(small, big), concat(up, big))


@pytest.mark.parametrize("channels, norm", [(16, "bn"), (64, "bn"), (16, "gn"), (64, "gn"), (48, "gn")])
def test_grouped_concat_output_halves_see_one_input_each(channels: int, norm: str) -> None:
    torch.manual_seed(0)
    agg = build_aggregation("concat", channels, concat="grouped", norm=norm)  # train mode: batch statistics
    assert n_params(agg) == 2 * channels + 2 * (2 * channels)  # C groups x 2 weights, norm(2C) affine
    x, y = torch.randn(4, channels, 5, 5), torch.randn(4, channels, 5, 5)
    half = channels // 2
    out = agg(x, y)
    out_y = agg(x, y + torch.randn_like(y))
    out_x = agg(x + torch.randn_like(x), y)
    assert torch.equal(out[:, :half], out_y[:, :half])
    assert (out[:, half:] - out_y[:, half:]).abs().amax(dim=(0, 2, 3)).min() > 0  # every 2nd-half channel moves
    assert torch.equal(out[:, half:], out_x[:, half:])
    assert (out[:, :half] - out_x[:, :half]).abs().amax(dim=(0, 2, 3)).min() > 0


def test_dense_concat_mixes_both_inputs_into_every_channel() -> None:
    torch.manual_seed(0)
    agg = build_aggregation("concat", C, concat="dense")
    assert n_params(agg) == 2 * C * C + 2 * (2 * C)
    x, y = torch.randn(4, C, 5, 5), torch.randn(4, C, 5, 5)
    moved = (agg(x, y) - agg(x, y + torch.randn_like(y))).abs().amax(dim=(0, 2, 3))
    assert moved.min() > 0


def test_group_norm_matches_torch_and_accepts_single_value_groups() -> None:
    torch.manual_seed(0)
    gn = group_norm(16)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    x = torch.randn(2, 16, 5, 4)
    assert torch.allclose(gn(x), F.group_norm(x, 16, gn.weight, gn.bias, gn.eps), atol=1e-6)
    # One image, a 1x1 level and one channel per group: every value is its group's mean -> output = bias.
    assert torch.allclose(gn(torch.randn(1, 16, 1, 1)).flatten(), gn.bias, atol=1e-4)
