"""The decoder a genotype describes: FPN -> (width adapter) -> FCOS head.

``Decoder`` is what the search trains on cached backbone features and what the detector puts on a backbone.
It takes ``{"c2", "c3", "c4", "c5"}`` (strides 4..32) and returns :class:`HeadOutputs` for P3..P7.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

from torch import Tensor, nn

from nasfcos.errors import UserError
from nasfcos.nn.fpn import PlainFPN, SearchedFPN
from nasfcos.nn.heads import FCOSHead
from nasfcos.nn.ops import init_convs_
from nasfcos.space.genotype import Genotype
from nasfcos.space.genotype import PlainFPN as PlainFPNGenotype
from nasfcos.space.ops import NUM_LEVELS, PYRAMID_STRIDES

__all__ = ["HeadOutputs", "Decoder", "build_fpn"]

DEFAULT_STRIDES = PYRAMID_STRIDES


class HeadOutputs(NamedTuple):
    """Raw FCOS outputs, one tensor per level P3..P7.

    ``cls_logits[l]``: ``N x K x H_l x W_l`` logits; ``bbox_reg[l]``: ``N x 4 x H_l x W_l`` distances (left, top,
    right, bottom) in **input pixels**, positive (``exp``, vanilla) or non-negative (``relu * stride``, improved);
    ``centerness[l]``: ``N x 1 x H_l x W_l`` logits.
    """

    cls_logits: list[Tensor]
    bbox_reg: list[Tensor]
    centerness: list[Tensor]


def build_fpn(genotype: Genotype, in_channels: Mapping[str, int], width: int, concat: str = "grouped") -> nn.Module:
    """The FPN module of a genotype: the hand-designed FPN for ``PlainFPN``, else the searched cells."""
    fpn = genotype.fpn
    if isinstance(fpn, PlainFPNGenotype):
        return PlainFPN(in_channels, width, conv=fpn.conv)
    return SearchedFPN(fpn, in_channels, width, concat=concat, outputs=genotype.fpn_outputs())


class Decoder(nn.Module):
    """FPN (searched or plain) -> 1x1 adapter when ``fpn_width != head_width`` -> :class:`FCOSHead`.

    The adapter (NAS-FCOS@128-256 style widths) is one plain 1x1 conv with bias, shared across the levels and
    initialised like the FPN's convs (``kaiming_uniform(a=1)``, bias 0). ``concat`` selects the grouped (released)
    or dense (paper) 1x1 after concatenation, in the FPN and in a cell head alike.

    Works for any input size: P3..P5 take the C3..C5 sizes, P6/P7 are stride-2 convs (exact halving when the input
    is divisible by 128). ``channels_last`` inputs are accepted (every op is memory-format agnostic).
    """

    def __init__(
        self,
        genotype: Genotype,
        in_channels: Mapping[str, int],
        num_classes: int,
        fpn_width: int = 256,
        head_width: int = 256,
        fcos: str = "vanilla",
        concat: str = "grouped",
        strides: Sequence[int] = DEFAULT_STRIDES,
    ) -> None:
        super().__init__()
        for field, value in (("fpn_width", fpn_width), ("head_width", head_width)):
            if int(value) < 2 or int(value) % 2:
                raise UserError(f"{field}: must be an even number >= 2 (got {value}); deformable convs use 2 groups")
        if len(strides) != NUM_LEVELS:
            raise UserError(f"strides: the pyramid has {NUM_LEVELS} levels P3..P7 (got {len(strides)} strides)")
        if not isinstance(genotype, Genotype):
            raise UserError(f"genotype: expected a nasfcos.Genotype (got {type(genotype).__name__})")
        genotype.validate(num_levels=len(strides))
        self.genotype = genotype
        self.strides = tuple(int(s) for s in strides)
        self.fpn = build_fpn(genotype, in_channels, fpn_width, concat=concat)
        if fpn_width != head_width:
            self.adapter: nn.Module | None = nn.Conv2d(fpn_width, head_width, 1)
            init_convs_(self.adapter, "kaiming_uniform")
        else:
            self.adapter = None
        self.head = FCOSHead(
            genotype.head,
            head_width,
            num_classes,
            num_levels=len(self.strides),
            fcos=fcos,
            strides=self.strides,
            concat=concat,
        )

    def forward(self, features: Mapping[str, Tensor]) -> HeadOutputs:
        levels = self.fpn(features)
        if self.adapter is not None:
            levels = [self.adapter(p) for p in levels]
        cls_logits, bbox_reg, centerness = self.head(levels)
        return HeadOutputs(cls_logits, bbox_reg, centerness)
