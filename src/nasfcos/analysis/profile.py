"""Parameters, multiply-accumulates (GMACs) and CPU/GPU latency of a network, the way detection papers count.

The counting rule (what is a MAC, what is a parameter, deformable convs included) lives in
:mod:`nasfcos.nn.cost`, which the search uses too; this module runs it on generated images, splits the numbers
into backbone and decoder, and times the forward pass.

By default the call is the *raw* network (``model.forward_raw(x)``, which the detector has, else
``decoder(backbone(x))``, else ``model(x)``), so detector post-processing is never part of the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nasfcos.errors import UserError
from nasfcos.nn.cost import (
    ForwardFn,
    count_macs,
    count_parameters,
    count_per_module,
    eval_mode,
    module_macs,
    raw_forward,
    sum_under,
    time_forward_ms,
)

__all__ = [
    "count_macs",
    "count_parameters",
    "format_markdown_table",
    "module_macs",
    "parse_size",
    "profile",
    "profile_parts",
]


# ---------------------------------------------------------------------------------------------- running


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1088"`` -> ``(800, 1088)`` (height x width); anything else is a :class:`UserError`."""
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


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _summary(params: int, macs: int) -> dict[str, Any]:
    return {"params": params, "params_m": params / 1e6, "macs": macs, "gmacs": macs / 1e9}


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
    call = forward_fn or raw_forward
    inputs, hw = _make_inputs(model, size, batch, input_channels, example_inputs)
    with eval_mode(model, threads):
        macs, params = count_per_module(model, inputs, call, meta)
        result = _summary(sum(params.values()), sum(macs.values()))
        result["size"] = list(hw) if hw is not None else None
        if latency:
            times = time_forward_ms(model, inputs, call, warmup=warmup, repeats=repeats)
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
    call = forward_fn or raw_forward
    inputs, hw = _make_inputs(model, size, batch, input_channels, example_inputs)
    with eval_mode(model):
        macs, params = count_per_module(model, inputs, call, meta)
    parts: dict[str, dict[str, Any]] = {"whole": _summary(sum_under(params, None), sum_under(macs, None))}
    if isinstance(getattr(model, "backbone", None), nn.Module) and isinstance(getattr(model, "decoder", None), nn.Module):
        for part in ("backbone", "decoder"):
            parts[part] = _summary(sum_under(params, part), sum_under(macs, part))
    for entry in parts.values():
        entry["size"] = list(hw) if hw is not None else None
    return parts


# ------------------------------------------------------------------------------------------------ output


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with the precision the caller already applied (``str``)."""
    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
