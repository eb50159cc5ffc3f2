"""Parameters and multiply-accumulates (GMACs) of a network, counted the way detection papers count.

This is the counting rule alone, low in the layers so that the search (a decoder's cost on cached features)
and the profiler (:mod:`nasfcos.analysis.profile`, which adds latency) share it. What is counted
(``FACTS.md`` section 6):

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
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "Cost",
    "ForwardFn",
    "count_cost",
    "count_macs",
    "count_parameters",
    "count_per_module",
    "eval_mode",
    "module_macs",
    "raw_forward",
    "sum_under",
    "time_forward_ms",
]

ForwardFn = Callable[[nn.Module, Any], Any]

_COUNTED_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(frozen=True)
class Cost:
    """Parameters and MACs of one forward pass."""

    params: int
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


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
    return callable(getattr(module, "extra_macs", None)) or isinstance(module, _COUNTED_LAYERS)


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


def sum_under(values: Mapping[str, int], prefix: str | None) -> int:
    """Sum of the entries named ``prefix`` or ``prefix.*`` (all entries for ``None``)."""
    if prefix is None:
        return sum(values.values())
    return sum(v for k, v in values.items() if k == prefix or k.startswith(prefix + "."))


def raw_forward(model: nn.Module, inputs: Any) -> Any:
    """The raw network: ``forward_raw`` if the model has one, else backbone -> decoder, else ``model(x)``.

    A tuple of inputs is passed as positional arguments; detector post-processing is never part of the call.
    """
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


@contextmanager
def eval_mode(model: nn.Module, threads: int | None = None) -> Iterator[None]:
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


def _to_meta(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to("meta")
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_meta(item) for item in inputs)
    if isinstance(inputs, dict):
        return {key: _to_meta(value) for key, value in inputs.items()}
    return inputs


def count_per_module(
    model: nn.Module, inputs: Any, forward_fn: ForwardFn | None = None, meta: bool = False
) -> tuple[dict[str, int], dict[str, int]]:
    """``(MACs per module name, parameters per name)`` of one ``forward_fn(model, inputs)`` call.

    Call it in :func:`eval_mode`. With ``meta`` the MACs come from a copy of the model on PyTorch's ``meta``
    device: shapes propagate and the hooks fire but nothing is computed (the same numbers for any network whose
    forward does not read tensor values, every decoder here).
    """
    call = forward_fn or raw_forward
    params = count_parameters(model)
    if meta:
        with torch.inference_mode(False), torch.no_grad():  # a plain (non-inference) copy can move devices
            model = copy.deepcopy(model).to("meta").eval()
            inputs = _to_meta(inputs)
    with count_macs(model) as macs:
        call(model, inputs)
    return dict(macs), params


def count_cost(model: nn.Module, inputs: Any, *, forward_fn: ForwardFn | None = None, meta: bool = False) -> Cost:
    """Total parameters and MACs of ``model`` on ``inputs`` (eval mode, no grad; the training flag is restored).

    ``inputs`` as in :func:`raw_forward`: a tuple is passed as positional arguments (``(features,)`` for a bare
    decoder), a tensor goes to ``forward_raw`` when the model has one.
    """
    with eval_mode(model):
        macs, params = count_per_module(model, inputs, forward_fn, meta)
    return Cost(params=sum(params.values()), macs=sum(macs.values()))


def time_forward_ms(model: nn.Module, inputs: Any, forward_fn: ForwardFn | None = None, *, warmup: int = 3,
                    repeats: int = 10) -> list[float]:
    """Wall times (ms) of ``repeats`` calls of ``forward_fn(model, inputs)`` (default :func:`raw_forward`) after
    ``warmup`` untimed ones, CUDA synchronised around each call. The caller chooses the mode and threads
    (:func:`eval_mode`): the search times a candidate decoder with this, ``nasfcos profile`` a whole detector."""
    import time

    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_forward_ms: repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    call = forward_fn or raw_forward
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call(model, inputs)
    synchronize()
    times_ms: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(model, inputs)
        synchronize()
        times_ms.append((time.perf_counter() - start) * 1000.0)
    return times_ms
