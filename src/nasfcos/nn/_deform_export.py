"""An exportable formulation of the modulated deformable convolution (ONNX, TorchScript tracing).

Same semantics and the same sampling arithmetic as the native path (``_deform_native._samples``), but written only
with ops every exporter knows: floor, comparisons, ``index_select`` of the four corner rows, a weighted sum and a
matmul. It materialises all four corners at once, so it is slower and hungrier than the native path; it is used
only while exporting or tracing (``deform_conv2d`` switches to it automatically).
"""

from __future__ import annotations

from torch import Tensor

from ._deform_native import Geometry, _Plan, _samples, _to_table, _weight_matrix


def deform_conv2d_exportable(
    input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None, geo: Geometry
) -> Tensor:
    """Deformable conv as gather + weighted sum + matmul, traceable by ``torch.onnx.export`` and ``torch.jit``."""
    plan = _Plan(geo, input.dtype, input.device, max_bags=0)  # not cached: tracing records its tensors
    table = _to_table(input, geo)
    offset_pm = offset.permute(0, 2, 3, 1).reshape(geo.pixels, 2 * geo.dg * geo.k2)
    mask_pm = None if mask is None else mask.permute(0, 2, 3, 1).reshape(geo.pixels, geo.dg * geo.k2)
    s = _samples(plan, offset_pm, mask_pm, 0, geo.pixels)
    rows = s.rows.reshape(-1)
    col = None
    for shift, corner_weight in zip(plan.shifts, s.corner_weights()):
        term = table.index_select(0, rows + shift) * corner_weight.reshape(-1, 1)
        col = term if col is None else col + term
    out = col.reshape(geo.pixels, geo.k) @ _weight_matrix(weight, geo)
    if bias is not None:
        out = out + bias
    return out.reshape(geo.n, geo.ho, geo.wo, geo.cout).permute(0, 3, 1, 2)
