"""Feature pyramids: the searched FPN (NAS-FCOS cells) and the hand-designed FCOS v1 FPN.

Both take the backbone features ``{"c2", "c3", "c4", "c5"}`` (strides 4, 8, 16, 32) and return
``[p3, p4, p5, p6, p7]`` (strides 8 .. 128), every level with ``width`` channels. P3/P4/P5 always have exactly the
C3/C4/C5 spatial sizes, so any input size works; P6/P7 halve P5/P6 with a stride-2 3x3 conv (``ceil(n / 2)``), which
is the exact stride only when the input size is divisible by 128.

Convolutions not inside a searched op are initialised as FCOS does: ``kaiming_uniform(a=1)``, bias 0; the searched
ops get the same init (offset/mask convs of deformable ops stay zero).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.errors import UserError
from nasfcos.nn.deform import ModulatedDeformConv2d
from nasfcos.nn.ops import build_aggregation, build_fpn_op, init_convs_, match_sizes, resize_to
from nasfcos.space.genotype import FPNCell, FPNOutputs, fpn_outputs
from nasfcos.space.ops import BACKBONE_FEATURES, PLAIN_FPN_CONVS
from nasfcos.space.pools import fpn_live_entries

__all__ = ["BACKBONE_KEYS", "SearchedFPN", "PlainFPN", "LastLevelsP6P7", "fpn_outputs_of"]

BACKBONE_KEYS = BACKBONE_FEATURES
"""The initial FPN pool, in pool-index order (FACTS 2: pool 0 = C2 .. 3 = C5)."""


def fpn_outputs_of(cells: Sequence[FPNCell]) -> FPNOutputs:
    """The output rule (P5, P4, P3 and dangling pool indices) of a cell sequence; the rule lives in ``space``."""
    return fpn_outputs(tuple(cells))


def _check_in_channels(in_channels: Mapping[str, int], needed: Sequence[str]) -> None:
    missing = [k for k in needed if k not in in_channels]
    if missing:
        raise UserError(
            f"in_channels: missing backbone feature(s) {', '.join(missing)} (got {sorted(in_channels)}); "
            f"expected keys among {', '.join(BACKBONE_KEYS)}"
        )


class LastLevelsP6P7(nn.Module):
    """P6 = conv3x3 stride 2 (bias, no norm) on P5; P7 = conv3x3 stride 2 on ReLU(P6) (FCOS)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, p5: Tensor) -> tuple[Tensor, Tensor]:
        p6 = self.p6(p5)
        p7 = self.p7(F.relu(p6))
        return p6, p7


class _FPNCellModule(nn.Module):
    """One basic block: ``agg(op1(pool[in1]), op2(pool[in2]))`` (the aggregation resizes to the larger input)."""

    def __init__(self, cell: FPNCell, width: int, concat: str) -> None:
        super().__init__()
        self.in1 = int(cell.in1)
        self.in2 = int(cell.in2)
        self.op1 = build_fpn_op(cell.op1, width)
        self.op2 = build_fpn_op(cell.op2, width)
        self.agg = build_aggregation(cell.agg, width, concat=concat)

    def forward(self, pool: Mapping[int, Tensor]) -> Tensor:
        return self.agg(self.op1(pool[self.in1]), self.op2(pool[self.in2]))


class SearchedFPN(nn.Module):
    """The NAS-FCOS FPN: backbone features mapped to ``width``, then the genotype's cells, then the output rule.

    Pool: indices 0..3 are C2..C5 (each first mapped by 1x1 conv + BN + ReLU), cell ``t`` (0-based) appends index
    ``4 + t``. Outputs (``outputs`` or :meth:`Genotype.fpn_outputs`): P5, P4, P3 are pool entries; every dangling
    entry is added to each of them in creation order (paper eq. 1: at each add the smaller map is bilinearly
    upsampled to the larger); then P5/P4/P3 are bilinearly resized to the C5/C4/C3 sizes. P6/P7 follow FCOS.

    Only pool entries that the outputs depend on are built and computed: a backbone feature no cell reads gets no
    1x1 mapping (and need not be in ``in_channels``), so no parameter is ever left without a gradient.
    """

    def __init__(
        self,
        cells: Sequence[FPNCell],
        in_channels: Mapping[str, int],
        width: int,
        concat: str = "grouped",
        outputs: FPNOutputs | None = None,
    ) -> None:
        super().__init__()
        cells = tuple(cells)
        if not cells:
            raise UserError("fpn: a searched FPN needs at least one cell (got 0)")
        self.width = width
        out = fpn_outputs_of(cells) if outputs is None else outputs
        self.p5_index, self.p4_index, self.p3_index = int(out.p5), int(out.p4), int(out.p3)
        self.dangling = tuple(int(i) for i in out.dangling)

        num_inputs = len(BACKBONE_KEYS)
        self.used = fpn_live_entries(cells, out)

        used_keys = [BACKBONE_KEYS[i] for i in self.used if i < num_inputs]
        _check_in_channels(in_channels, used_keys)
        self.inputs = nn.ModuleDict(
            {
                key: nn.Sequential(
                    nn.Conv2d(in_channels[key], width, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
                for key in used_keys
            }
        )
        self.cells = nn.ModuleDict(
            {str(i): _FPNCellModule(cells[i - num_inputs], width, concat) for i in self.used if i >= num_inputs}
        )
        self.top = LastLevelsP6P7(width)
        init_convs_(self, "kaiming_uniform")

    def forward(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        pool: dict[int, Tensor] = {}
        for index, key in enumerate(BACKBONE_KEYS):
            if key in self.inputs:
                pool[index] = self.inputs[key](features[key])
        for index in self.used:
            if index >= len(BACKBONE_KEYS):
                pool[index] = self.cells[str(index)](pool)

        levels = []
        for index, key in ((self.p3_index, "c3"), (self.p4_index, "c4"), (self.p5_index, "c5")):
            p = pool[index]
            for extra in self.dangling:
                p, d = match_sizes(p, pool[extra])
                p = p + d
            levels.append(resize_to(p, features[key].shape[-2:]))
        p3, p4, p5 = levels
        p6, p7 = self.top(p5)
        return [p3, p4, p5, p6, p7]


class PlainFPN(nn.Module):
    """FCOS v1's FPN on C3..C5: 1x1 laterals (bias), top-down nearest upsampling + add, 3x3 output convs.

    Output convs have a bias and no norm; ``conv="dcn3x3"`` makes them modulated deformable convs
    (Deformable-FPN-FCOS). P6 comes from the P5 *output* (FCOS v1, ``use_P5``), P7 from ReLU(P6).
    """

    CONVS = PLAIN_FPN_CONVS

    def __init__(self, in_channels: Mapping[str, int], width: int, conv: str = "conv3x3") -> None:
        super().__init__()
        if conv not in self.CONVS:
            raise UserError(f"fpn.conv: unknown plain FPN conv (got {conv!r}); expected one of {', '.join(self.CONVS)}")
        keys = ("c3", "c4", "c5")
        _check_in_channels(in_channels, keys)
        self.width = width
        self.lateral = nn.ModuleDict({k: nn.Conv2d(in_channels[k], width, 1) for k in keys})
        if conv == "conv3x3":
            self.output = nn.ModuleDict({k: nn.Conv2d(width, width, 3, padding=1) for k in keys})
        else:
            self.output = nn.ModuleDict({k: ModulatedDeformConv2d(width, width, 3, padding=1) for k in keys})
        self.top = LastLevelsP6P7(width)
        init_convs_(self, "kaiming_uniform")

    def forward(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        inner = self.lateral["c5"](features["c5"])
        outs = [self.output["c5"](inner)]
        for key in ("c4", "c3"):
            lateral = self.lateral[key](features[key])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output[key](inner))
        p6, p7 = self.top(outs[-1])
        return [*outs, p6, p7]
