"""Where the FCOS points are, and how per-level maps line up with them.

FCOS predicts one set of outputs per feature-map cell. Each cell (x, y) of a level with stride s stands for
the input-image point ``(x*s + s//2, y*s + s//2)`` (FACTS 4): the centre of the cell's receptive stride
window. Points are listed row-major (``y`` outer, ``x`` inner) so that they match a ``[N, C, H, W]`` map
flattened to ``[N, H*W, C]`` by :func:`flatten_levels`; targets, losses and post-processing all rely on
that shared order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nasfcos.space.ops import PYRAMID_STRIDES

__all__ = ["level_points", "flatten_levels", "DEFAULT_STRIDES"]

DEFAULT_STRIDES: tuple[int, ...] = PYRAMID_STRIDES
"""Strides of pyramid levels P3..P7 (:data:`nasfcos.space.ops.PYRAMID_STRIDES`)."""


def level_points(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Input-pixel coordinates of every feature-map cell, one tensor per level.

    Args:
        sizes: ``(H, W)`` of each level's feature map, P3 first.
        strides: the stride of each level (same length as ``sizes``).
        device, dtype: of the returned tensors.

    Returns:
        ``[H*W, 2]`` tensors of ``(x, y)`` per level, row-major (``y`` outer, ``x`` inner), at
        ``(x*s + s//2, y*s + s//2)``.
    """
    if len(sizes) != len(strides):
        raise ValueError(f"level_points: {len(sizes)} sizes but {len(strides)} strides")
    points = []
    for (height, width), stride in zip(sizes, strides):
        stride = int(stride)
        xs = torch.arange(int(width), device=device, dtype=dtype) * stride + stride // 2
        ys = torch.arange(int(height), device=device, dtype=dtype) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1))
    return points


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Turn per-level ``[N, C, H, W]`` maps into one ``[N, sum(H*W), C]`` tensor in point order.

    The result lines up with ``torch.cat(level_points(...))``: level P3 first, each level row-major.
    """
    if len(maps) == 0:
        raise ValueError("flatten_levels: no levels given")
    flat = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps]
    return torch.cat(flat, dim=1)
