"""Parameters, multiply-accumulates (GMACs) and CPU/GPU latency of a network, the way detection papers count.

What is counted (``FACTS.md`` section 6):

- **MACs** of the layers that do the arithmetic — convolutions (``Conv1d/2d/3d``: ``N * Cout * Cin/groups *
  prod(kernel) * prod(output size)``, any stride, dilation or grouping), transposed convolutions (``N * Cin *
  Cout/groups * prod(kernel) * prod(input size)``) and ``Linear`` layers (``in_features`` MACs per output value).
  Bias adds are not MACs. Papers' "FLOPs" for detectors (Table 2 of NAS-FCOS included) are these MACs.
- A module with an ``extra_macs(input_shape) -> int`` method reports its own MACs (that number replaces any
  formula above for that module; its children are still counted by their own hooks). The project's deformable
  conv (:class:`nasfcos.nn.deform.ModulatedDeformConv2d`) uses it for the main conv plus the bilinear sampling and
  mask multiply; its offset/mask predictor is a plain ``nn.Conv2d`` child. Generic counters (fvcore, mmcv,
  ``torch.utils.flop_counter``) count deformable convs as zero; we do not.
- **Not counted**: normalisation, activations, pooling, upsampling/interpolation, element-wise sums and
  concatenations, post-processing (score threshold, NMS). They are memory-bound and small next to the convs,
  and leaving them out is what makes our numbers comparable with the papers'.
- **Parameters**: every ``nn.Parameter`` (frozen or not; shared ones once) plus the affine ``weight``/``bias``
  of ``FrozenBatchNorm2d`` layers, which torchvision keeps as buffers but which are the backbone's BN parameters;
  so the count does not depend on whether BN is frozen. Running statistics are not parameters.

Counting uses forward hooks, so it follows what the forward pass really runs: a head shared across five pyramid
levels is counted five times for MACs and once for parameters.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "BackboneDecoder",
    "build_backbone_decoder",
    "count_macs",
    "count_parameters",
    "format_markdown_table",
    "module_macs",
    "parse_size",
    "profile",
    "profile_parts",
    "resolve_arch_widths",
]

ForwardFn = Callable[[nn.Module, Any], Any]


# -------------------------------------------------------------------------------------------- counting rules


def module_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    """MACs of one call of ``module`` itself (children excluded); 0 for layers that are not counted."""
    extra = getattr(module, "extra_macs", None)
    if callable(extra):
        first = inputs[0] if inputs else None
        if not isinstance(first, Tensor):
            raise TypeError(f"{type(module).__name__}.extra_macs needs a tensor input, got {type(first).__name__}")
        return int(extra(tuple(first.shape)))
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return int(inputs[0].numel()) * per_input
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return int(output.numel()) * per_output
    if isinstance(module, nn.Linear):
        return int(output.numel()) * module.in_features
    return 0


def _is_counted(module: nn.Module) -> bool:
    return callable(getattr(module, "extra_macs", None)) or isinstance(
        module,
        (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
            nn.Linear,
        ),
    )


@contextmanager
def count_macs(model: nn.Module) -> Iterator[dict[str, int]]:
    """Within the block, accumulate MACs per module name (``""`` = ``model`` itself) over every forward call."""
    totals: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if _is_counted(module):
            totals[name] = 0

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, _name: str = name) -> None:
                totals[_name] += module_macs(mod, inputs, output)

            handles.append(module.register_forward_hook(hook))
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{parameter name: numel}`` for every parameter (shared ones once) and every FrozenBatchNorm2d affine."""
    counts = {name: p.numel() for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            for attr in ("weight", "bias"):
                key = f"{module_name}.{attr}" if module_name else attr
                counts[key] = getattr(module, attr).numel()
    return counts


def _sum_under(values: Mapping[str, int], prefix: str | None) -> int:
    if prefix is None:
        return sum(values.values())
    return sum(v for k, v in values.items() if k == prefix or k.startswith(prefix + "."))


# ---------------------------------------------------------------------------------------------- running


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1088"`` -> ``(800, 1088)`` (height x width); anything else is a :class:`UserError`."""
    from nasfcos.errors import UserError

    parts = text.lower().replace("*", "x").split("x")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise UserError(f"--size: expected HEIGHTxWIDTH such as 800x1088 (got {text!r})") from None
    if height < 32 or width < 32:
        raise UserError(f"--size: height and width must be at least 32 pixels (got {text!r})")
    return height, width


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    """The raw network: ``forward_raw`` if the model has one, else backbone -> decoder, else ``model(x)``."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Tensor):
        forward_raw = getattr(model, "forward_raw", None)
        if callable(forward_raw):
            return forward_raw(inputs)
        backbone, decoder = getattr(model, "backbone", None), getattr(model, "decoder", None)
        if isinstance(backbone, nn.Module) and isinstance(decoder, nn.Module):
            return decoder(backbone(inputs))
    return model(inputs)  # a tensor for plain modules, a list of images for a full detector in eval mode


def _make_inputs(
    model: nn.Module, size: Sequence[int], batch: int, input_channels: int, example_inputs: Any
) -> tuple[Any, tuple[int, int] | None]:
    if example_inputs is not None:
        # Report the image size when the inputs are images (a tensor, or a list/tuple starting with one);
        # other inputs (a dict of backbone features for a bare decoder) have no single input size.
        first = example_inputs
        while isinstance(first, (tuple, list)) and first:
            first = first[0]
        if isinstance(first, Tensor) and first.dim() >= 2:
            return example_inputs, (int(first.shape[-2]), int(first.shape[-1]))
        return example_inputs, None
    height, width = (int(s) for s in size)
    device, dtype = _model_device_dtype(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, input_channels, height, width, generator=generator, dtype=dtype).to(device)
    return x, (height, width)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _eval_and_threads(model: nn.Module, threads: int | None) -> Iterator[None]:
    """Run in eval mode under ``inference_mode`` with ``threads`` CPU threads; restore everything after."""
    was_training = model.training
    old_threads = torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            yield
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        model.train(was_training)


def _measure_latency(
    model: nn.Module, inputs: Any, forward_fn: ForwardFn, warmup: int, repeats: int
) -> list[float]:
    device, _ = _model_device_dtype(model)
    for _ in range(warmup):
        forward_fn(model, inputs)
    _synchronize(device)
    times_ms: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_fn(model, inputs)
        _synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1000.0)
    return times_ms


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _summary(params: int, macs: int) -> dict[str, Any]:
    return {"params": params, "params_m": params / 1e6, "macs": macs, "gmacs": macs / 1e9}


def _count(
    model: nn.Module, inputs: Any, forward_fn: ForwardFn, meta: bool
) -> tuple[dict[str, int], dict[str, int]]:
    """MACs per module name and parameters per name; on a meta-device copy when ``meta`` (no arithmetic)."""
    params = count_parameters(model)
    if meta:
        with torch.inference_mode(False), torch.no_grad():  # a plain (non-inference) copy can move devices
            model = copy.deepcopy(model).to("meta").eval()
            inputs = _to_meta(inputs)
    with count_macs(model) as macs:
        forward_fn(model, inputs)
    return dict(macs), params


def _to_meta(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to("meta")
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_meta(item) for item in inputs)
    if isinstance(inputs, dict):
        return {key: _to_meta(value) for key, value in inputs.items()}
    return inputs


def profile(
    model: nn.Module,
    size: Sequence[int] = (800, 1088),
    latency: bool = False,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    input_channels: int = 3,
    batch: int = 1,
    example_inputs: Any = None,
    forward_fn: ForwardFn | None = None,
    meta: bool = False,
) -> dict[str, Any]:
    """Count parameters and MACs of ``model`` on one input of ``size`` = (height, width); optionally time it.

    By default the input is ``batch`` random images of ``input_channels x H x W`` on the model's device and the
    call is the *raw* network (``model.forward_raw(x)`` if defined, else ``model.decoder(model.backbone(x))``
    for a backbone+decoder model, else ``model(x)``), so detector post-processing is not part of the numbers.
    ``example_inputs`` replaces the generated input (a tuple is passed as positional arguments, a list of
    images goes to ``model(list)``); ``forward_fn(model, inputs)`` replaces the call. The model runs in eval
    mode under ``torch.inference_mode``; its training flag and the thread count are restored afterwards.

    Returns ``params, params_m, macs, gmacs, size`` ([H, W] of the input images; ``None`` when
    ``example_inputs`` are not images) and, with ``latency=True``, ``latency_ms_median,
    latency_ms_p90, threads, repeats`` (after ``warmup`` untimed calls).

    ``meta=True`` counts MACs on a copy of the model moved to PyTorch's ``meta`` device: shapes propagate and the
    hooks fire, but nothing is computed, so 800x1088 takes about a second instead of a full CPU forward pass. It
    gives the same numbers for any network whose forward does not read tensor values (every decoder here);
    latency is still measured on the real model.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"profile: repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    call = forward_fn or _default_forward
    inputs, hw = _make_inputs(model, size, batch, input_channels, example_inputs)
    with _eval_and_threads(model, threads):
        macs, params = _count(model, inputs, call, meta)
        result = _summary(sum(params.values()), sum(macs.values()))
        result["size"] = list(hw) if hw is not None else None
        if latency:
            times = _measure_latency(model, inputs, call, warmup, repeats)
            result["latency_ms_median"] = statistics.median(times)
            result["latency_ms_p90"] = _percentile(times, 90)
            result["threads"] = torch.get_num_threads()
            result["repeats"] = repeats
    return result


def profile_parts(
    model: nn.Module,
    size: Sequence[int] = (800, 1088),
    example_inputs: Any = None,
    forward_fn: ForwardFn | None = None,
    input_channels: int = 3,
    batch: int = 1,
    meta: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{"whole": ..., "backbone": ..., "decoder": ...}`` (each with params, params_m, macs, gmacs) from one pass.

    The parts are the ``model.backbone`` and ``model.decoder`` submodules; a model without both gets only
    ``"whole"``. Whole = backbone + decoder + anything else the model owns. ``meta`` as in :func:`profile`.
    """
    call = forward_fn or _default_forward
    inputs, hw = _make_inputs(model, size, batch, input_channels, example_inputs)
    with _eval_and_threads(model, None):
        macs, params = _count(model, inputs, call, meta)
    parts: dict[str, dict[str, Any]] = {"whole": _summary(_sum_under(params, None), _sum_under(macs, None))}
    if isinstance(getattr(model, "backbone", None), nn.Module) and isinstance(getattr(model, "decoder", None), nn.Module):
        for part in ("backbone", "decoder"):
            parts[part] = _summary(_sum_under(params, part), _sum_under(macs, part))
    for entry in parts.values():
        entry["size"] = list(hw) if hw is not None else None
    return parts


# ------------------------------------------------------------------------------------ backbone + decoder


class BackboneDecoder(nn.Module):
    """Backbone + decoder without the detector's pre/post-processing: what Table 2 counts.

    (Stand-in until the detector exposes ``forward_raw``; it has the same ``.backbone``/``.decoder`` layout.)
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward_raw(self, images: Tensor) -> Any:
        """Normalised image batch ``(N, 3, H, W)`` -> the decoder's raw head outputs."""
        return self.decoder(self.backbone(images))

    def forward(self, images: Tensor) -> Any:
        return self.forward_raw(images)


def build_backbone_decoder(
    arch: Any,
    backbone: str = "resnet50",
    num_classes: int = 80,
    fpn_width: int | None = None,
    head_width: int | None = None,
    fcos: str = "vanilla",
    concat: str | None = None,
) -> BackboneDecoder:
    """Build backbone ``backbone`` + the decoder of ``arch`` (a preset name, a genotype JSON file or text, or a
    ``Genotype``). Widths and the concat mode default to the preset's (256/256/grouped for a bare genotype)."""
    from nasfcos.nn.backbones import build_backbone
    from nasfcos.nn.decoder import Decoder

    genotype, preset_fpn, preset_head, preset_concat = resolve_arch_widths(arch)
    net = build_backbone(backbone, weights=None)
    decoder = Decoder(
        genotype,
        in_channels=dict(net.out_channels),
        num_classes=num_classes,
        fpn_width=fpn_width if fpn_width is not None else preset_fpn,
        head_width=head_width if head_width is not None else preset_head,
        fcos=fcos,
        concat=concat if concat is not None else preset_concat,
    )
    return BackboneDecoder(net, decoder)


def resolve_arch_widths(arch: Any) -> tuple[Any, int, int, str]:
    """``(genotype, fpn_width, head_width, concat)`` for a preset name (``@W``/``@F-H`` suffixes included), a
    genotype JSON path, a ``Preset`` or a ``Genotype``; non-presets get 256/256/grouped."""
    from nasfcos.space.presets import resolve_preset

    preset = resolve_preset(arch)
    return preset.genotype.validate(), preset.fpn_width, preset.head_width, preset.concat


# ------------------------------------------------------------------------------------------------ output


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with the precision the caller already applied (``str``)."""
    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
