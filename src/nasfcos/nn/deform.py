"""Modulated deformable convolution (DCNv2) with torchvision's semantics and a fast CPU path.

``deform_conv2d`` has the signature and the semantics of ``torchvision.ops.deform_conv2d`` (offset layout, bilinear
sampling with zeros outside the image, stride, padding, dilation, deformable groups, weight groups, mask, bias)
and dispatches by device: this project's gather + GEMM path (``_deform_native``) on the CPU, where torchvision's
kernel is ~74x slower than a plain conv, and torchvision's kernel elsewhere (CUDA). ``ModulatedDeformConv2d`` is the
search space's ``dcn3x3`` building block. See ``docs/deform.md`` for the design and the measurements.

Backend selection, strongest first: the ``backend=`` argument when it is not ``"auto"``; :func:`set_backend`;
the environment variable ``NASFCOS_DEFORM_BACKEND``; then the device (``"native"`` on the CPU, ``"torchvision"``
otherwise). While exporting (ONNX, ``torch.export``) or tracing, an exportable formulation is used instead.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ._deform_export import deform_conv2d_exportable
from ._deform_native import DEFAULT_CHUNK_BYTES, DEFAULT_SAVE_BYTES, Geometry, deform_conv2d_native

IntPair = Union[int, tuple[int, int]]

BACKENDS = ("auto", "native", "torchvision")
ENV_VAR = "NASFCOS_DEFORM_BACKEND"
_NATIVE_DTYPES = (torch.float32, torch.float64)

_default_backend: str | None = None
_chunk_bytes = DEFAULT_CHUNK_BYTES
_save_bytes = DEFAULT_SAVE_BYTES


def set_backend(backend: str | None) -> None:
    """Set the process-wide backend used when a call passes ``backend="auto"``.

    ``None`` or ``"auto"`` restores the default (``$NASFCOS_DEFORM_BACKEND``, else by device).
    """
    global _default_backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"deform backend must be one of {BACKENDS} (got {backend!r})")
    _default_backend = None if backend == "auto" else backend


def get_backend() -> str:
    """The process-wide default: the setter's value, else ``$NASFCOS_DEFORM_BACKEND``, else ``"auto"``."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"${ENV_VAR} must be one of {BACKENDS} (got {env!r})")
    return env


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"native"`` or ``"torchvision"``) that a call with ``backend`` on ``device`` uses."""
    if backend not in BACKENDS:
        raise ValueError(f"deform backend must be one of {BACKENDS} (got {backend!r})")
    if backend == "auto":
        backend = get_backend()
    if backend == "auto":
        backend = "native" if device.type == "cpu" else "torchvision"
    return backend


def set_memory_budget(chunk_bytes: int | None = None, save_bytes: int | None = None) -> None:
    """Tune the native path's memory.

    ``chunk_bytes``: bytes of sampled columns processed at once (the batch and image are cut into chunks of output
    pixels of about this size; peak extra memory is a small multiple of it, per worker thread).
    ``save_bytes``: keep the forward's columns for the backward when all of them fit in this many bytes (saves one
    gather per chunk in the backward; 0 = always recompute, which bounds memory at any batch size).
    """
    global _chunk_bytes, _save_bytes
    if chunk_bytes is not None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive (got {chunk_bytes})")
        _chunk_bytes = int(chunk_bytes)
    if save_bytes is not None:
        if save_bytes < 0:
            raise ValueError(f"save_bytes must be >= 0 (got {save_bytes})")
        _save_bytes = int(save_bytes)


def _geometry(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
) -> Geometry:
    """Check every shape against torchvision's contract and return the call's geometry.

    Invalid channel / deformable-group / group combinations raise ``ValueError`` naming the numbers.
    """
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"deform_conv2d: input, offset and weight must be 4-D (got {input.dim()}, {offset.dim()}, {weight.dim()})"
        )
    n, cin, h, w = input.shape
    cout, cin_per_group, kh, kw = weight.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"deform_conv2d: stride and dilation must be >= 1 and padding >= 0 "
            f"(got stride={(sh, sw)}, dilation={(dh, dw)}, padding={(ph, pw)})"
        )
    if cin_per_group < 1 or cin % cin_per_group != 0:
        raise ValueError(
            f"deform_conv2d: input channels ({cin}) must be a multiple of weight.shape[1] ({cin_per_group})"
        )
    groups = cin // cin_per_group
    if cout % groups != 0:
        raise ValueError(f"deform_conv2d: output channels ({cout}) must be divisible by the groups ({groups})")
    k2 = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * k2) != 0:
        raise ValueError(
            f"deform_conv2d: offset channels ({offset.shape[1]}) must be a positive multiple of "
            f"2*kh*kw = {2 * k2}"
        )
    dg = offset.shape[1] // (2 * k2)
    if cin % dg != 0:
        raise ValueError(
            f"deform_conv2d: input channels ({cin}) must be divisible by the deformable groups ({dg}, from "
            f"offset channels {offset.shape[1]} = 2 * {dg} * {kh} * {kw})"
        )
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv2d: the output would be empty ({ho}x{wo}) for a {h}x{w} input")
    if tuple(offset.shape) != (n, 2 * dg * k2, ho, wo):
        raise ValueError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} does not match (N, 2*dg*kh*kw, Hout, Wout) = "
            f"{(n, 2 * dg * k2, ho, wo)}"
        )
    if mask is not None and tuple(mask.shape) != (n, dg * k2, ho, wo):
        raise ValueError(
            f"deform_conv2d: mask shape {tuple(mask.shape)} does not match (N, dg*kh*kw, Hout, Wout) = "
            f"{(n, dg * k2, ho, wo)}"
        )
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"deform_conv2d: bias shape {tuple(bias.shape)} does not match ({cout},)")
    return Geometry(n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, dh, dw, dg, groups, ho, wo)


def _exporting() -> bool:
    """True while ONNX-exporting, TorchScript-tracing or compiling/exporting with dynamo."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    return (
        torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or (compiling is not None and bool(compiling()))
    )


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Modulated deformable conv with ``torchvision.ops.deform_conv2d``'s semantics, dispatched by device.

    Args: as ``torchvision.ops.deform_conv2d`` (``offset``: [N, 2*dg*kh*kw, Hout, Wout] with (dy, dx) pairs per
    deformable group and tap; ``mask``: [N, dg*kh*kw, Hout, Wout] or ``None`` for DCNv1), plus ``backend``:
    ``"native"`` (this project's path: any device, fast on the CPU), ``"torchvision"`` (torchvision's kernel) or
    ``"auto"`` (see the module docstring). Raises ``ValueError`` for inconsistent shapes.
    """
    geo = _geometry(input, offset, weight, bias, mask, stride, padding, dilation)
    if _exporting() or geo.n == 0:  # (an empty batch: plain ops give the right empty result and grads)
        return deform_conv2d_exportable(input, offset, mask, weight, bias, geo)
    if resolve_backend(backend, input.device) == "torchvision":
        import torchvision.ops

        return torchvision.ops.deform_conv2d(
            input,
            offset,
            weight,
            bias,
            stride=(geo.sh, geo.sw),
            padding=(geo.ph, geo.pw),
            dilation=(geo.dh, geo.dw),
            mask=mask,
        )
    if input.dtype not in _NATIVE_DTYPES:  # half / bfloat16: compute in float32
        dtype = input.dtype
        as32 = [None if t is None else t.float() for t in (input, offset, mask, weight, bias)]
        return deform_conv2d_native(*as32, geo, _chunk_bytes, _save_bytes).to(dtype)
    return deform_conv2d_native(input, offset, mask, weight, bias, geo, _chunk_bytes, _save_bytes)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2: offsets and a sigmoid mask from a zero-initialised conv, then a deformable conv with bias.

    ``offset_mask`` (a plain ``nn.Conv2d`` child, so profilers count it like any conv) predicts
    ``deformable_groups * 3 * k * k`` channels: the first ``2 * dg * k * k`` are the offsets in torchvision's
    layout, the last ``dg * k * k`` pass through a sigmoid to become the mask. Zero-initialised, so the layer starts
    as a plain conv with its weights halved (offsets 0, mask 0.5).
    """

    is_deformable = True  # lets the profiler recognise the layer and call ``extra_macs``

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        deformable_groups: int = 2,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if deformable_groups < 1 or in_channels % deformable_groups != 0:
            raise ValueError(
                f"ModulatedDeformConv2d: in_channels ({in_channels}) must be divisible by deformable_groups "
                f"({deformable_groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        k2 = kernel_size * kernel_size
        self.offset_mask = nn.Conv2d(
            in_channels, deformable_groups * 3 * k2, kernel_size, stride, padding, dilation, bias=True
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1.0 / (self.in_channels * self.kernel_size * self.kernel_size) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset_mask(x)
        n_offset = 2 * self.deformable_groups * self.kernel_size * self.kernel_size
        offset = out[:, :n_offset]
        mask = torch.sigmoid(out[:, n_offset:])
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask=mask)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        span = self.dilation * (self.kernel_size - 1) + 1
        return (
            (height + 2 * self.padding - span) // self.stride + 1,
            (width + 2 * self.padding - span) // self.stride + 1,
        )

    def extra_macs(self, input_shape: tuple[int, int, int, int]) -> int:
        """Multiply-accumulates of the deformable part for an input of shape ``(N, C, H, W)`` (the whole batch).

        Counted: the main conv, ``N * Cout * Cin * k*k * Hout * Wout``, plus the sampling,
        ``5 * N * Cin * k*k * Hout * Wout`` (4 MACs for the bilinear interpolation of each sampled value and 1 for the
        mask multiply). Not counted here: the bias adds (not MACs) and the offset/mask conv, a plain ``nn.Conv2d``
        child that the profiler's conv hooks count.
        """
        n, _, h, w = input_shape
        ho, wo = self.output_size(h, w)
        sampled = n * self.in_channels * self.kernel_size * self.kernel_size * ho * wo
        return sampled * self.out_channels + 5 * sampled

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, deformable_groups={self.deformable_groups}, "
            f"bias={self.bias is not None}"
        )
