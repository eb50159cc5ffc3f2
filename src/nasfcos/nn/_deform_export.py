"""An exportable formulation of the modulated deformable convolution: one ``grid_sample`` and one 1x1 conv.

Why: ONNX has a ``DeformConv`` op only since opset 19, ONNX Runtime does not implement it, and the torch exporters
do not map to it; the native path (``_deform_native``) is a custom autograd function that no exporter can see
through. This formulation uses only ops that every exporter maps to standard ONNX (``GridSample``, opset >= 16,
``Conv``, element-wise arithmetic, ``Range``) and that ONNX Runtime runs:

1. every output pixel's sampling position for each deformable group and tap is its undeformed tap position plus
   the predicted ``(dy, dx)``, in the input's pixels (torchvision's semantics);
2. one bilinear ``grid_sample`` with ``padding_mode="zeros"`` and ``align_corners=False`` samples all of them at
   once (the groups folded into the batch, the taps into the grid's rows). With ``align_corners=False`` pixel
   ``x`` is the grid coordinate ``(2x + 1) / W - 1``, and zero padding makes a corner outside the image read
   zero, which is exactly torchvision's bilinear rule (a sample at ``y <= -1`` or ``y >= H`` is zero);
3. the mask multiplies the sampled columns, which a grouped 1x1 convolution with the reshaped weight reduces.

Shapes are read from the tensors, not from the call's :class:`Geometry`, so the exported graph keeps dynamic
image sizes (``--dynamic``); only the hyper-parameters (kernel, stride, padding, dilation, groups) are baked in.
It is used while exporting, tracing or compiling and for empty batches (``deform_conv2d`` switches to it); it
is differentiable (plain ops), slower than the native path on the CPU for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._deform_native import Geometry


def _base_positions(geo: Geometry, ho: Tensor | int, wo: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Undeformed sampling rows ``[k2, Ho, 1]`` and columns ``[k2, 1, Wo]`` of every tap and output pixel."""
    taps_y = [a * geo.dh for a in range(geo.kh) for _ in range(geo.kw)]  # tap t = (a, b), row-major
    taps_x = [b * geo.dw for _ in range(geo.kh) for b in range(geo.kw)]
    ty = torch.tensor(taps_y, device=like.device, dtype=like.dtype)
    tx = torch.tensor(taps_x, device=like.device, dtype=like.dtype)
    rows = torch.arange(ho, device=like.device, dtype=like.dtype) * geo.sh - geo.ph
    cols = torch.arange(wo, device=like.device, dtype=like.dtype) * geo.sw - geo.pw
    return ty[:, None, None] + rows[None, :, None], tx[:, None, None] + cols[None, None, :]


def deform_conv2d_exportable(
    input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None, geo: Geometry
) -> Tensor:
    """Deformable conv (torchvision's semantics) as ``grid_sample`` + grouped 1x1 conv; exportable to ONNX.

    ``geo`` supplies the hyper-parameters; the sizes come from ``input`` and ``offset`` so that they stay
    symbolic under ``torch.export`` and traced under ``torch.onnx.export(dynamo=False)``. Only views and one
    ``stack``, no transposes: the deformable groups go into the batch and the taps into the grid's rows, which
    is also the (group, channel, tap) order the weight's columns have.
    """
    n, h, w = input.shape[0], input.shape[2], input.shape[3]
    ho, wo = offset.shape[2], offset.shape[3]
    dg, k2 = geo.dg, geo.k2
    base_y, base_x = _base_positions(geo, ho, wo, offset)
    # offset [N, dg*k2*2, Ho, Wo], (dy, dx) per group and tap -> [N*dg, k2, 2, Ho, Wo].
    off = offset.reshape(n * dg, k2, 2, ho, wo)
    y = off[:, :, 0] + base_y  # [N*dg, k2, Ho, Wo]
    x = off[:, :, 1] + base_x
    # Pixel -> normalised grid coordinate (align_corners=False); the grid holds (x, y) pairs.
    grid = torch.stack(((2.0 * x + 1.0) / w - 1.0, (2.0 * y + 1.0) / h - 1.0), dim=-1)
    sampled = F.grid_sample(
        input.reshape(n * dg, geo.cg, h, w),
        grid.reshape(n * dg, k2 * ho, wo, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [N*dg, Cg, k2*Ho, Wo]
    if mask is not None:  # [N, dg*k2, Ho, Wo] is already [N*dg, 1, k2*Ho, Wo] in memory
        sampled = sampled * mask.reshape(n * dg, 1, k2 * ho, wo)
    # [N*dg, Cg, k2*Ho, Wo] -> columns [N, Cin*k2, Ho, Wo] in (channel, tap) order, weight.reshape(Cout, -1)'s.
    columns = sampled.reshape(n, geo.cin * k2, ho, wo)
    kernel = weight.reshape(geo.cout, (geo.cin // geo.groups) * k2, 1, 1)
    return F.conv2d(columns, kernel, bias, groups=geo.groups)
