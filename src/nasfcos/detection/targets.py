"""FCOS target assignment: which ground-truth box (if any) every point regresses, and what it learns.

The rules (FACTS 4) are FCOS v1's, as NAS-FCOS trains with them, plus the later "improved" FCOS options:

* A point is a candidate for a box when it lies **strictly** inside the box (``min(l, t, r, b) > 0``; a point
  exactly on an edge is not inside).  With ``center_sampling_radius`` (improved FCOS, 1.5) it must instead lie
  strictly inside the box's centre region: the square of half-side ``radius * stride`` around the box centre,
  clipped to the box (so a box smaller than the region keeps the whole box; the point is always inside the box).
* The point's level must "care" about the box: ``lo <= max(l, t, r, b) <= hi`` for the level's regress range
  ``(lo, hi)``; defaults ``(-1, 64), (64, 128), (128, 256), (256, 512), (512, inf)`` for P3..P7.  The test is
  inclusive at both ends, as in the released code, so a distance of exactly 64 is in range on P3 *and* on P4.
  That is no double assignment: P3 points sit at ``8k + 4`` and P4 points at ``16k + 8``, so no two levels
  share a point; it only means a box whose maximal distance from some P3 point and some P4 point is exactly 64
  is learnt by both of them.
* A point that is a candidate for several boxes takes the one with the smallest area (first in the input
  order among equal areas).
* Regression targets are the distances ``(l, t, r, b)`` from the point to the matched box's sides (divided by
  the level's stride with ``normalize_by_stride``); the centerness target is
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``.

Everything is vectorised over points x boxes; the per-level information enters as per-point tensors
(``level_ranges``, ``strides``), built once by :func:`make_level_ranges`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nasfcos.detection.points import DEFAULT_STRIDES

__all__ = [
    "FCOSTargets",
    "DEFAULT_RANGES",
    "default_ranges",
    "make_level_ranges",
    "assign_targets",
    "assign_targets_batch",
]


def default_ranges(num_levels: int = 5, first: float = 64.0) -> tuple[tuple[float, float], ...]:
    """FCOS regress ranges for ``num_levels`` levels: ``(-1, first), (first, 2 first), ..., (last, inf)``.

    ``default_ranges(5)`` is ``((-1, 64), (64, 128), (128, 256), (256, 512), (512, inf))``.
    """
    if num_levels < 1:
        raise ValueError(f"default_ranges: num_levels must be >= 1 (got {num_levels})")
    bounds = [-1.0] + [first * 2.0**i for i in range(num_levels - 1)] + [math.inf]
    return tuple((bounds[i], bounds[i + 1]) for i in range(num_levels))


DEFAULT_RANGES: tuple[tuple[float, float], ...] = default_ranges(5)
"""Regress ranges of P3..P7 (FACTS 4)."""


class FCOSTargets(NamedTuple):
    """Per-point FCOS targets; leading ``[N]`` batch dimension when produced by :func:`assign_targets_batch`.

    Fields (``P`` points):
        labels: ``[P]`` int64 class in ``0..K-1``, ``-1`` for background.
        boxes: ``[P, 4]`` matched ground-truth box (xyxy pixels), zeros for background.
        reg: ``[P, 4]`` distances ``(l, t, r, b)`` to the matched box (pixels, or strides when normalised),
            zeros for background.
        centerness: ``[P]`` centerness target, ``0`` for background.
        matched: ``[P]`` int64 index of the matched box in the image's box list, ``-1`` for background.
    """

    labels: Tensor
    boxes: Tensor
    reg: Tensor
    centerness: Tensor
    matched: Tensor

    def to(self, device: torch.device | str) -> "FCOSTargets":
        """The same targets on ``device`` (dtypes unchanged)."""
        return FCOSTargets(*(value.to(device) for value in self))

    @property
    def positive(self) -> Tensor:
        """Boolean mask of positive points (same shape as ``labels``)."""
        return self.labels >= 0


def make_level_ranges(
    points_per_level: Sequence[Tensor | int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    ranges: Sequence[tuple[float, float]] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Per-point regress range and stride for points concatenated level by level.

    Args:
        points_per_level: each level's points tensor ``[HW_l, 2]`` or just its point count.
        strides: each level's stride.
        ranges: each level's ``(lo, hi)``; default :func:`default_ranges` for that many levels.
        device: of the results (default: the first points tensor's device, else CPU).

    Returns:
        ``(level_ranges [P, 2], strides [P])`` in ``dtype``, with ``P = sum HW_l``.
    """
    num_levels = len(points_per_level)
    if ranges is None:
        ranges = default_ranges(num_levels)
    if len(strides) != num_levels or len(ranges) != num_levels:
        raise ValueError(
            f"make_level_ranges: {num_levels} levels of points, {len(strides)} strides, {len(ranges)} ranges"
        )
    counts = []
    for level in points_per_level:
        if isinstance(level, Tensor):
            counts.append(int(level.shape[0]))
            if device is None:
                device = level.device
        else:
            counts.append(int(level))
    counts_t = torch.tensor(counts, device=device)
    level_ranges = torch.tensor([list(map(float, r)) for r in ranges], dtype=dtype, device=device)
    stride_t = torch.tensor([float(s) for s in strides], dtype=dtype, device=device)
    return (
        torch.repeat_interleave(level_ranges, counts_t, dim=0),
        torch.repeat_interleave(stride_t, counts_t, dim=0),
    )


def _background(num_points: int, device: torch.device, dtype: torch.dtype) -> FCOSTargets:
    return FCOSTargets(
        labels=torch.full((num_points,), -1, dtype=torch.int64, device=device),
        boxes=torch.zeros((num_points, 4), dtype=dtype, device=device),
        reg=torch.zeros((num_points, 4), dtype=dtype, device=device),
        centerness=torch.zeros((num_points,), dtype=dtype, device=device),
        matched=torch.full((num_points,), -1, dtype=torch.int64, device=device),
    )


def assign_targets(
    points: Tensor,
    boxes: Tensor,
    labels: Tensor,
    *,
    level_ranges: Tensor,
    strides: Tensor,
    center_sampling_radius: float | None = None,
    normalize_by_stride: bool = False,
) -> FCOSTargets:
    """Assign FCOS targets for one image: each point gets the box it regresses, or background.

    Args:
        points: ``[P, 2]`` float ``(x, y)`` input-pixel coordinates of all points, levels concatenated
            (``torch.cat(level_points(...))``).
        boxes: ``[M, 4]`` ground-truth boxes, xyxy float pixels (``M`` may be 0).
        labels: ``[M]`` integer classes in ``0..K-1``.
        level_ranges: ``[P, 2]`` the ``(lo, hi)`` regress range of each point's level; a point can take a box
            only when ``lo <= max(l, t, r, b) <= hi`` (inclusive at both ends).
        strides: ``[P]`` each point's level stride (for centre sampling and ``normalize_by_stride``).
        center_sampling_radius: ``None`` (FCOS v1, NAS-FCOS: any point strictly inside the box) or the radius
            in strides of the centre region (improved FCOS: 1.5); the region is clipped to the box.
        normalize_by_stride: divide the regression targets by the point's stride (improved FCOS).

    Returns:
        :class:`FCOSTargets` with ``labels [P]`` int64 (``-1`` background), ``boxes [P, 4]`` matched box
        (zeros for background), ``reg [P, 4]`` ``(l, t, r, b)`` (zeros for background), ``centerness [P]``
        (``0`` for background) and ``matched [P]`` int64 box index (``-1`` for background).

    Ties between boxes go to the smallest area. Fully vectorised: memory is ``O(P * M)``.
    """
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"assign_targets: points must be [P, 2] (got {tuple(points.shape)})")
    num_points = points.shape[0]
    if level_ranges.shape != (num_points, 2) or strides.shape != (num_points,):
        raise ValueError(
            f"assign_targets: level_ranges {tuple(level_ranges.shape)} / strides {tuple(strides.shape)} "
            f"do not match {num_points} points"
        )
    boxes = boxes.reshape(-1, 4) if boxes.numel() == 0 else boxes
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
        raise ValueError(
            f"assign_targets: boxes must be [M, 4] and labels [M] (got {tuple(boxes.shape)}, {tuple(labels.shape)})"
        )
    dtype = points.dtype if points.is_floating_point() else torch.float32
    device = points.device
    if boxes.shape[0] == 0:
        return _background(num_points, device, dtype)

    points = points.to(dtype)
    boxes = boxes.to(device=device, dtype=dtype)
    labels = labels.to(device=device, dtype=torch.int64)
    level_ranges = level_ranges.to(device=device, dtype=dtype)
    strides = strides.to(device=device, dtype=dtype)

    xs = points[:, 0, None]  # [P, 1]
    ys = points[:, 1, None]
    x0, y0, x1, y1 = boxes.unbind(dim=1)  # each [M]
    ltrb = torch.stack((xs - x0, ys - y0, x1 - xs, y1 - ys), dim=2)  # [P, M, 4]

    if center_sampling_radius is None:
        inside = ltrb.amin(dim=2) > 0
    else:
        radius = strides[:, None] * float(center_sampling_radius)  # [P, 1]
        cx = (x0 + x1) / 2
        cy = (y0 + y1) / 2
        rx0 = torch.maximum(cx - radius, x0)
        ry0 = torch.maximum(cy - radius, y0)
        rx1 = torch.minimum(cx + radius, x1)
        ry1 = torch.minimum(cy + radius, y1)
        region = torch.stack((xs - rx0, ys - ry0, rx1 - xs, ry1 - ys), dim=2)
        inside = region.amin(dim=2) > 0

    max_dist = ltrb.amax(dim=2)  # [P, M]
    in_range = (max_dist >= level_ranges[:, 0:1]) & (max_dist <= level_ranges[:, 1:2])
    candidate = inside & in_range

    areas = (x1 - x0) * (y1 - y0)  # [M]
    masked_areas = torch.where(candidate, areas[None, :], torch.full_like(max_dist, math.inf))
    best = masked_areas.argmin(dim=1)  # first minimum: smallest area, earliest box on ties
    positive = candidate.any(dim=1)

    point_index = torch.arange(num_points, device=device)
    reg = ltrb[point_index, best]  # [P, 4]
    left, top, right, bottom = reg.unbind(dim=1)
    tiny = torch.finfo(dtype).tiny
    ratio_lr = torch.minimum(left, right) / torch.maximum(left, right).clamp(min=tiny)
    ratio_tb = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=tiny)
    centerness = torch.sqrt((ratio_lr * ratio_tb).clamp(min=0))

    if normalize_by_stride:
        reg = reg / strides[:, None]

    zero = torch.zeros((), dtype=dtype, device=device)
    pos_col = positive[:, None]
    return FCOSTargets(
        labels=torch.where(positive, labels[best], torch.full_like(best, -1)),
        boxes=torch.where(pos_col, boxes[best], zero),
        reg=torch.where(pos_col, reg, zero),
        centerness=torch.where(positive, centerness, zero),
        matched=torch.where(positive, best, torch.full_like(best, -1)),
    )


def assign_targets_batch(
    points_per_level: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    *,
    ranges: Sequence[tuple[float, float]] | None = None,
    center_sampling_radius: float | None = None,
    normalize_by_stride: bool = False,
) -> FCOSTargets:
    """:func:`assign_targets` for a batch: per-level points shared by all images, one target dict per image.

    Args:
        points_per_level: ``[HW_l, 2]`` points of each level (:func:`~nasfcos.detection.points.level_points`).
        targets: per image ``{"boxes": [M_i, 4] xyxy, "labels": [M_i]}``.
        strides, ranges: per level (``ranges`` default :func:`default_ranges`).
        center_sampling_radius, normalize_by_stride: as in :func:`assign_targets`.

    Returns:
        :class:`FCOSTargets` whose fields have a leading ``[N]`` dimension (``[N, P]``, ``[N, P, 4]``).
    """
    points = torch.cat(list(points_per_level), dim=0)
    level_ranges, point_strides = make_level_ranges(
        points_per_level, strides, ranges, device=points.device, dtype=points.dtype
    )
    per_image = [
        assign_targets(
            points,
            target["boxes"],
            target["labels"],
            level_ranges=level_ranges,
            strides=point_strides,
            center_sampling_radius=center_sampling_radius,
            normalize_by_stride=normalize_by_stride,
        )
        for target in targets
    ]
    if not per_image:
        empty = _background(points.shape[0], points.device, points.dtype)
        return FCOSTargets(*(field[None][:0] for field in empty))
    return FCOSTargets(*(torch.stack(fields, dim=0) for fields in zip(*per_image)))
