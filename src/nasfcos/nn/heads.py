"""Prediction heads: searched towers with per-level partial weight sharing, and the FCOS predictors.

A *tower* maps each pyramid level's feature to a feature of the same shape. Two tower spaces exist:

- :class:`SequentialHeadModule` — the released head space: a plain sequence of ops (GN + ReLU inside each op,
  none after ``skip``: a ``skip`` layer is the identity, see :mod:`nasfcos.nn.ops`);
- :class:`CellHeadModule` — the paper's head space (Sec. 3.2.2): ``op0`` on ``p``, then two-input cells whose op
  outputs and aggregation all join the pool; the output is the last cell's aggregation.

Per-level weight sharing (paper Sec. 3.2.3): ``share_from[l]`` is the first layer level ``l`` shares. For layer
``i``, every level with ``i < share_from[l]`` has its own copy, every level with ``share_from[l] <= i`` uses the one
shared copy, which exists only if at least one level uses it. ``share_from = (0,) * 5`` is FCOS's fully shared head.
Norms in a shared layer are shared too (GN is per sample, so this is exactly FCOS's shared tower).

:class:`FCOSHead` holds a classification and a regression tower of identical structure plus the predictors
(:class:`FCOSPredictor`). Box outputs are **distances in input pixels** from the location to the box's left, top,
right and bottom sides in both modes: ``"vanilla"`` (FCOS v1) predicts ``exp(scale * x)`` (strictly positive) and
regresses pixel targets; ``"improved"`` predicts ``relu(scale * x) * stride`` (non-negative), i.e. the stride-
normalised regression of the later FCOS, scaled back to pixels here so downstream code sees one unit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from nasfcos.errors import UserError
from nasfcos.nn.ops import build_aggregation, build_head_op, init_convs_
from nasfcos.space.genotype import CellHead, HeadCell, SequentialHead
from nasfcos.space.ops import FCOS_MODES, PYRAMID_STRIDES, head_pool_size
from nasfcos.space.pools import cell_head_live_entries, head_cell_entries, head_output_index

__all__ = [
    "FCOS_MODES",
    "SharedLayer",
    "SequentialHeadModule",
    "CellHeadModule",
    "build_tower",
    "Scale",
    "FCOSPredictor",
    "FCOSHead",
]

def _check_share_from(share_from: Sequence[int], num_levels: int, num_layers: int, field: str) -> tuple[int, ...]:
    share = tuple(int(s) for s in share_from)
    if len(share) != num_levels:
        raise UserError(f"{field}: needs one entry per pyramid level (got {len(share)}); expected {num_levels}")
    bad = [s for s in share if not 0 <= s <= num_layers]
    if bad:
        raise UserError(f"{field}: share index out of range (got {bad[0]}); expected 0..{num_layers}")
    return share


class SharedLayer(nn.Module):
    """One head layer in its per-level copies (``own``, keyed by level) and its optional ``shared`` copy.

    ``for_level(l)`` returns the module level ``l`` uses. Built by a factory so every copy is independent; a
    layer whose factory returns parameter-free modules (``skip``) simply has parameter-free copies.
    """

    def __init__(self, build: Callable[[], nn.Module], own_levels: Sequence[int], shared: bool) -> None:
        super().__init__()
        self.own = nn.ModuleDict({str(level): build() for level in own_levels})
        self.shared = build() if shared else None

    def for_level(self, level: int) -> nn.Module:
        key = str(level)
        if key in self.own:
            return self.own[key]
        if self.shared is None:
            raise RuntimeError(f"head layer has neither a copy for level {level} nor a shared copy")
        return self.shared


def _layer(build: Callable[[], nn.Module], index: int, share_from: Sequence[int]) -> SharedLayer:
    own = [level for level, s in enumerate(share_from) if index < s]
    return SharedLayer(build, own, shared=len(own) < len(share_from))


class SequentialHeadModule(nn.Module):
    """The released head space: ``len(head.ops)`` ops in sequence, partially shared across levels."""

    def __init__(self, head: SequentialHead, channels: int, num_levels: int = 5) -> None:
        super().__init__()
        ops = tuple(head.ops)
        self.num_levels = num_levels
        self.share_from = _check_share_from(head.share_from, num_levels, len(ops), "head.share_from")
        self.layers = nn.ModuleList(
            [_layer(lambda name=name: build_head_op(name, channels), i, self.share_from) for i, name in enumerate(ops)]
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"head expects {self.num_levels} levels, got {len(features)}")
        outs = []
        for level, x in enumerate(features):
            for layer in self.layers:
                x = layer.for_level(level)(x)
            outs.append(x)
        return outs


class _HeadCellModule(nn.Module):
    """A head cell's modules, each present only if its output is needed: ``op1``, ``op2`` and ``agg``."""

    def __init__(
        self, cell: HeadCell, channels: int, concat: str, need_op1: bool, need_op2: bool, need_agg: bool
    ) -> None:
        super().__init__()
        self.op1 = build_head_op(cell.op1, channels) if need_op1 else None
        self.op2 = build_head_op(cell.op2, channels) if need_op2 else None
        self.agg = build_aggregation(cell.agg, channels, concat=concat, norm="gn") if need_agg else None


class CellHeadModule(nn.Module):
    """The paper's head space: ``op0``, then cells over a growing pool; output = last cell's aggregation.

    Pool: 0 = ``p``, 1 = ``o0 = op0(p)``; cell ``t`` (1-based) appends ``op1(pool[in1])``, ``op2(pool[in2])`` and
    their aggregation (indices ``3t - 1``, ``3t``, ``3t + 1``). For sharing, layer 0 is ``op0`` and layer ``t`` is
    cell ``t``. Pool entries the output does not depend on are neither built nor computed (no parameter without a
    gradient). Aggregations use GN (``concat`` as in the FPN, with GN(2C) instead of BN(2C)).
    """

    def __init__(self, head: CellHead, channels: int, num_levels: int = 5, concat: str = "grouped") -> None:
        super().__init__()
        cells = tuple(head.cells)
        if not cells:
            raise UserError("head.cells: a cell head needs at least one cell (got 0)")
        self.num_levels = num_levels
        self.share_from = _check_share_from(head.share_from, num_levels, len(cells) + 1, "head.share_from")
        self.inputs: list[tuple[int, int]] = []
        for t, cell in enumerate(cells):
            size = head_pool_size(t)
            in1, in2 = int(cell.in1), int(cell.in2)
            if not (0 <= in1 < size and 0 <= in2 < size):
                raise UserError(
                    f"head.cells[{t}]: input index out of range (got {in1}, {in2}); expected 0..{size - 1}"
                )
            self.inputs.append((in1, in2))
        self.output_index = head_output_index(len(cells))
        self.needed = needed = cell_head_live_entries(head)

        def build_op0() -> nn.Module:
            return build_head_op(head.op0, channels)

        def cell_factory(cell: HeadCell, flags: tuple[bool, bool, bool]) -> Callable[[], nn.Module]:
            return lambda: _HeadCellModule(cell, channels, concat, *flags)

        layers: list[SharedLayer | None] = [_layer(build_op0, 0, self.share_from) if 1 in needed else None]
        for t, cell in enumerate(cells):
            flags = tuple(index in needed for index in head_cell_entries(t))
            layers.append(_layer(cell_factory(cell, flags), t + 1, self.share_from) if any(flags) else None)
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(layers) if layer is not None})

    def _forward_level(self, level: int, p: Tensor) -> Tensor:
        pool: dict[int, Tensor] = {0: p}
        if "0" in self.layers:
            pool[1] = self.layers["0"].for_level(level)(p)
        for t, (in1, in2) in enumerate(self.inputs):
            if str(t + 1) not in self.layers:
                continue
            cell: _HeadCellModule = self.layers[str(t + 1)].for_level(level)
            o1, o2, agg = head_cell_entries(t)
            if cell.op1 is not None:
                pool[o1] = cell.op1(pool[in1])
            if cell.op2 is not None:
                pool[o2] = cell.op2(pool[in2])
            if cell.agg is not None:
                pool[agg] = cell.agg(pool[o1], pool[o2])
        return pool[self.output_index]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"head expects {self.num_levels} levels, got {len(features)}")
        return [self._forward_level(level, x) for level, x in enumerate(features)]


def build_tower(
    head: SequentialHead | CellHead, channels: int, num_levels: int = 5, concat: str = "grouped"
) -> nn.Module:
    """A tower for a head genotype: ``SequentialHead`` -> :class:`SequentialHeadModule`, ``CellHead`` -> cells."""
    if isinstance(head, SequentialHead):
        return SequentialHeadModule(head, channels, num_levels)
    if isinstance(head, CellHead):
        return CellHeadModule(head, channels, num_levels, concat=concat)
    raise UserError(f"head: unknown head genotype (got {type(head).__name__}); expected SequentialHead or CellHead")


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level, FCOS)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSPredictor(nn.Module):
    """The 3x3 predictor convs (shared across levels) and the per-level box scales.

    Init (FCOS): normal(std 0.01), bias 0, except the class bias ``-log((1 - prior_prob) / prior_prob)`` so that
    every location starts at foreground probability ``prior_prob``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: Sequence[int],
        fcos: str = "vanilla",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if fcos not in FCOS_MODES:
            raise UserError(f"fcos: unknown FCOS variant (got {fcos!r}); expected one of {', '.join(FCOS_MODES)}")
        if num_classes < 1:
            raise UserError(f"num_classes: must be at least 1 (got {num_classes})")
        if not 0.0 < prior_prob < 1.0:
            raise UserError(f"prior_prob: must be in (0, 1) (got {prior_prob})")
        self.fcos = fcos
        self.strides = tuple(int(s) for s in strides)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        init_convs_(self, "normal")
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def box(self, x: Tensor, level: int) -> Tensor:
        """Box distances in input pixels from the raw regression output of ``level``."""
        x = self.scales[level](self.bbox_pred(x))
        if self.fcos == "vanilla":
            return torch.exp(x)
        return torch.relu(x) * self.strides[level]


class FCOSHead(nn.Module):
    """Classification and regression towers of identical structure, then the FCOS predictors.

    ``forward(features)`` -> ``(cls_logits, bbox_reg, centerness)``, each a list with one tensor per level
    (``N x K``, ``N x 4``, ``N x 1`` channels). Centerness branches off the classification tower in ``"vanilla"``
    (FCOS v1) and off the regression tower in ``"improved"``. ``bbox_reg`` holds distances in input pixels.
    """

    def __init__(
        self,
        genotype_head: SequentialHead | CellHead,
        channels: int,
        num_classes: int,
        num_levels: int = 5,
        fcos: str = "vanilla",
        prior_prob: float = 0.01,
        strides: Sequence[int] = PYRAMID_STRIDES,
        concat: str = "grouped",
    ) -> None:
        super().__init__()
        if len(strides) != num_levels:
            raise UserError(f"strides: needs one stride per level (got {len(strides)}); expected {num_levels}")
        self.num_levels = num_levels
        self.fcos = fcos
        self.cls_tower = build_tower(genotype_head, channels, num_levels, concat)
        self.bbox_tower = build_tower(genotype_head, channels, num_levels, concat)
        init_convs_(self.cls_tower, "normal")
        init_convs_(self.bbox_tower, "normal")
        self.predictor = FCOSPredictor(channels, num_classes, strides, fcos=fcos, prior_prob=prior_prob)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls_feats = self.cls_tower(features)
        reg_feats = self.bbox_tower(features)
        pred = self.predictor
        cls_logits = [pred.cls_logits(f) for f in cls_feats]
        bbox_reg = [pred.box(f, level) for level, f in enumerate(reg_feats)]
        ctr_feats = cls_feats if self.fcos == "vanilla" else reg_feats
        centerness = [pred.centerness(f) for f in ctr_feats]
        return cls_logits, bbox_reg, centerness
