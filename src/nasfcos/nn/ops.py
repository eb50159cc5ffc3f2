"""The search space's unary operations and aggregations as torch modules.

Names are the ones of ``nasfcos.space.ops`` (the genotype stores op names, not integers). The FPN and the
head build the *same* named ops with different normalisations, as the released code does: BatchNorm in the FPN
(one FPN per image batch, statistics per GPU) and GroupNorm(32) in the head (the head is shared across pyramid
levels of very different statistics, and FCOS uses GN there).

Semantics (``FACTS.md`` section 2):

- separable conv = depthwise ``k x k`` (no bias) -> pointwise 1x1 (no bias) -> norm -> ReLU;
  ``sep3x3`` (dilation 1), ``sep3x3_d3`` (dilation 3, padding 3), ``sep5x5_d6`` (dilation 6, padding 12);
- ``dcn3x3`` = modulated deformable conv v2 (with bias, 2 deformable groups) -> norm -> ReLU;
- ``conv1x1`` / ``conv3x3`` (head only) = plain conv (with bias, as the FCOS tower) -> GN -> ReLU;
- ``skip`` = identity. It has no parameters and **no norm or ReLU after it**, in the head as well: a head layer
  that is ``skip`` passes its input through unchanged;
- ``sum`` = per-channel learnable ``a * x + b * y`` (``a = b = 1`` at start);
- ``concat`` = norm(2C) -> ReLU -> 1x1 conv 2C -> C without bias, either ``groups=C`` (``"grouped"``, the released
  code) or dense (``"dense"``, the paper's "concatenation followed by a 1x1 convolution").

Every op keeps the spatial size. Both aggregations first bring their two inputs to a common size by bilinearly
upsampling the smaller one (``align_corners=False``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.errors import UserError
from nasfcos.nn.deform import ModulatedDeformConv2d
from nasfcos.space.ops import CONCAT_MODES

__all__ = [
    "FPN_OP_NAMES",
    "HEAD_OP_NAMES",
    "AGGREGATION_NAMES",
    "CONCAT_MODES",
    "NORMS",
    "GroupNorm",
    "group_norm",
    "build_norm",
    "SepConv",
    "ConvNormAct",
    "DeformNormAct",
    "SumAggregation",
    "ConcatAggregation",
    "build_fpn_op",
    "build_head_op",
    "build_aggregation",
    "resize_to",
    "match_sizes",
    "init_convs_",
]

NORMS = ("bn", "gn")

# (kernel size, dilation) of the separable convs; padding keeps the size: dilation * (k - 1) / 2.
_SEP_SPECS: dict[str, tuple[int, int]] = {"sep3x3": (3, 1), "sep3x3_d3": (3, 3), "sep5x5_d6": (5, 6)}


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also accepts groups holding a single value (normalised to 0, output = bias).

    ``torch.nn.functional.group_norm`` refuses a group of one value, which happens for a batch of one image at a
    1x1 pyramid level (P7 of a small input) when the width is at most 32 (one channel per group). GN of a single
    value is well defined (its deviation from its own mean is 0), so this calls the kernel directly. Same
    parameters and state dict as ``nn.GroupNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest divisor of ``channels`` not above it (small widths)."""
    if channels < 1:
        raise ValueError(f"group_norm: channels must be positive (got {channels})")
    g = min(groups, channels)
    while channels % g != 0:
        g -= 1
    return GroupNorm(g, channels)


def build_norm(norm: str, channels: int) -> nn.Module:
    """``"bn"`` -> BatchNorm2d, ``"gn"`` -> :func:`group_norm`."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return group_norm(channels)
    raise UserError(f"norm: unknown normalisation (got {norm!r}); expected one of {', '.join(NORMS)}")


class SepConv(nn.Module):
    """Depthwise ``k x k`` (no bias) -> pointwise 1x1 (no bias) -> norm -> ReLU; keeps the spatial size."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, norm: str) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(
            channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels, bias=False
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = build_norm(norm, channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class ConvNormAct(nn.Module):
    """Plain ``k x k`` conv with bias -> norm -> ReLU (the FCOS tower layer)."""

    def __init__(self, channels: int, kernel_size: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.norm = build_norm(norm, channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class DeformNormAct(nn.Module):
    """Modulated deformable 3x3 conv (bias, 2 deformable groups, zero-initialised offsets) -> norm -> ReLU."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=True)
        self.norm = build_norm(norm, channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def _unknown(what: str, name: object, allowed: tuple[str, ...]) -> UserError:
    return UserError(f"{what}: unknown name (got {name!r}); expected one of {', '.join(allowed)}")


_FPN_BUILDERS: dict[str, Callable[[int, str], nn.Module]] = {
    "sep3x3": lambda c, norm: SepConv(c, *_SEP_SPECS["sep3x3"], norm),
    "sep3x3_d3": lambda c, norm: SepConv(c, *_SEP_SPECS["sep3x3_d3"], norm),
    "sep5x5_d6": lambda c, norm: SepConv(c, *_SEP_SPECS["sep5x5_d6"], norm),
    "skip": lambda c, norm: nn.Identity(),
    "dcn3x3": lambda c, norm: DeformNormAct(c, norm),
}
_HEAD_BUILDERS: dict[str, Callable[[int, str], nn.Module]] = {
    "conv1x1": lambda c, norm: ConvNormAct(c, 1, norm),
    "conv3x3": lambda c, norm: ConvNormAct(c, 3, norm),
    **_FPN_BUILDERS,
}

FPN_OP_NAMES: tuple[str, ...] = tuple(_FPN_BUILDERS)
"""Ops an FPN cell can use (``space.ops.FPN_OPS``)."""
HEAD_OP_NAMES: tuple[str, ...] = tuple(_HEAD_BUILDERS)
"""Ops a head layer can use: the released sequential head's ops plus the cell head's (the FPN ops)."""
AGGREGATION_NAMES: tuple[str, ...] = ("sum", "concat")


def build_fpn_op(name: str, channels: int, norm: str = "bn") -> nn.Module:
    """An FPN unary op by name (``sep3x3``, ``sep3x3_d3``, ``sep5x5_d6``, ``skip``, ``dcn3x3``); BN by default."""
    if name not in _FPN_BUILDERS:
        raise _unknown("fpn op", name, FPN_OP_NAMES)
    return _FPN_BUILDERS[name](channels, norm)


def build_head_op(name: str, channels: int, norm: str = "gn") -> nn.Module:
    """A head op by name (``conv1x1``, ``conv3x3`` and the FPN ops); GN by default. ``skip`` has no GN/ReLU."""
    if name not in _HEAD_BUILDERS:
        raise _unknown("head op", name, HEAD_OP_NAMES)
    return _HEAD_BUILDERS[name](channels, norm)


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize (``align_corners=False``) to ``size``; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def match_sizes(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two maps to one size: the smaller one (fewer pixels) is bilinearly resized to the larger one's size.

    Pyramid maps are ordered in both dimensions (a finer level is at least as tall *and* as wide), so "smaller"
    is unambiguous in practice; ties in area with different shapes resize ``y`` to ``x``.
    """
    hx, wx = x.shape[-2:]
    hy, wy = y.shape[-2:]
    if (hx, wx) == (hy, wy):
        return x, y
    if hx * wx >= hy * wy:
        return x, resize_to(y, (hx, wx))
    return resize_to(x, (hy, wy)), y


class SumAggregation(nn.Module):
    """``a * x + b * y`` with per-channel learnable ``a`` and ``b`` (both 1 at start), as the released code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.weight2 = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = match_sizes(x, y)
        return self.weight1 * x + self.weight2 * y


class ConcatAggregation(nn.Module):
    """``cat([x, y])`` -> norm(2C) -> ReLU -> 1x1 conv 2C -> C (no bias), grouped or dense.

    Grouped (``groups=C``, the released code): group ``g`` of a grouped conv reads input channels ``2g`` and
    ``2g + 1`` and writes output channel ``g``. Over ``cat([x, y])`` (``x`` in channels ``0..C-1``) group ``g``
    therefore reads ``x[2g], x[2g+1]`` for ``g < C/2`` and ``y[2g-C], y[2g-C+1]`` for ``g >= C/2``: output channels
    ``0..C/2-1`` depend only on the first input and ``C/2..C-1`` only on the second (each a learned pairwise mix of
    that input's channels). The norm is per channel (BN) or over groups that never straddle the two halves (GN
    with an even number of groups), so it keeps the property. For an odd ``C`` the middle output channel reads the
    last channel of ``x`` and the first of ``y``. Dense (the paper): every output channel reads all 2C inputs.
    """

    def __init__(self, channels: int, concat: str = "grouped", norm: str = "bn") -> None:
        super().__init__()
        if concat not in CONCAT_MODES:
            raise UserError(f"concat: unknown mode (got {concat!r}); expected one of {', '.join(CONCAT_MODES)}")
        self.concat = concat
        self.norm = build_norm(norm, 2 * channels)
        self.act = nn.ReLU(inplace=True)
        groups = channels if concat == "grouped" else 1
        self.conv = nn.Conv2d(2 * channels, channels, 1, groups=groups, bias=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = match_sizes(x, y)
        return self.conv(self.act(self.norm(torch.cat([x, y], dim=1))))


def build_aggregation(name: str, channels: int, concat: str = "grouped", norm: str = "bn") -> nn.Module:
    """An aggregation by name (``sum`` or ``concat``); ``concat`` selects the released grouped 1x1 or a dense one."""
    if name == "sum":
        return SumAggregation(channels)
    if name == "concat":
        return ConcatAggregation(channels, concat=concat, norm=norm)
    raise _unknown("aggregation", name, AGGREGATION_NAMES)


def _init_weight_(weight: Tensor, scheme: str) -> None:
    if scheme == "kaiming_uniform":
        nn.init.kaiming_uniform_(weight, a=1)
    elif scheme == "normal":
        nn.init.normal_(weight, std=0.01)
    else:
        raise ValueError(f"init scheme must be 'kaiming_uniform' or 'normal' (got {scheme!r})")


def init_convs_(module: nn.Module, scheme: str) -> None:
    """Initialise every conv in ``module`` the FCOS way; biases 0; deformable offset/mask convs stay zero.

    ``"kaiming_uniform"`` (``a=1``) is FCOS's FPN init, ``"normal"`` (std 0.01) its head-tower init. The main
    weight of a :class:`ModulatedDeformConv2d` gets the same scheme; its offset/mask predictor keeps its zero init
    so that every deformable conv starts on the regular grid (mask 0.5).
    """
    offset_convs = {id(m.offset_mask) for m in module.modules() if isinstance(m, ModulatedDeformConv2d)}
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in offset_convs:
            _init_weight_(m.weight, scheme)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, ModulatedDeformConv2d):
            _init_weight_(m.weight, scheme)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
