"""``export_onnx``: a trained FCOS detector to one ONNX file that ONNX Runtime runs, checked before it is written.

The export goes through ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript). Deformable convs are
lowered to ``GridSample`` + ``Conv`` (``nasfcos.nn._deform_export``), NMS becomes ``NonMaxSuppression``, and
nothing else is custom, so the file needs no ONNX Runtime extension.

Input contract of the file (also written into its ``doc_string``): ``images``, float32 ``[N, 3, H, W]``, RGB
in ``[0, 1]``, not normalised (the graph normalises with the detector's mean/std). A fixed-size export takes
exactly the exported ``N x H x W`` and pads to a multiple of the detector's ``size_divisible`` inside (so any
``H, W >= 32`` can be exported). A ``dynamic`` export takes any batch and any ``H, W`` that are multiples of
``size_divisible`` between :data:`DYNAMIC_MIN_BLOCKS` and :data:`DYNAMIC_MAX_BLOCKS` of them (pad a resized image
with the mean colour, which normalises to the zeros PyTorch pads with). Why the restrictions: ``torch.export``
must prove the searched FPN's shape-dependent branches for every size in the range, which it can only do when
the pyramid's sizes are exact halvings from at least 5 blocks (P7 at least 2x2) on.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nasfcos.detection.detector import FCOSDetector
from nasfcos.errors import UserError
from nasfcos.export.check import CheckReport, check_onnx, default_check_batches
from nasfcos.export.graph import (
    DYNAMIC_MAX_BLOCKS,
    DYNAMIC_MIN_BLOCKS,
    POSTPROCESS_OUTPUTS,
    DeployGraph,
    nms_per_image_onnx,
    raw_output_names,
)
from nasfcos.io import atomic_write_bytes

__all__ = [
    "export_onnx",
    "ExportResult",
    "ExportCheckError",
    "MIN_OPSET",
    "MAX_OPSET",
    "DEFAULT_OPSET",
    "DYNAMIC_MIN_BLOCKS",
    "DYNAMIC_MAX_BLOCKS",
]

MIN_OPSET = 18  # the dynamo exporter's base opset (GridSample itself needs >= 16)
MAX_OPSET = 23  # the newest opset torch's exporter emits
DEFAULT_OPSET = 18  # widest runtime support
_DYNAMIC_MAX_BATCH = 256


class ExportCheckError(RuntimeError):
    """The exported file disagrees with PyTorch beyond the stated tolerance (a bug, not a user mistake)."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how its check went."""

    path: Path | None
    num_bytes: int
    input_shape: tuple[Any, ...]  # ints, or names of dynamic dimensions
    output_names: tuple[str, ...]
    opset: int
    dynamic: bool
    postprocess: bool
    check: CheckReport | None

    def summary(self) -> str:
        """Multi-line human summary: the file, its input, and the check's lines."""
        shape = "x".join(str(d) for d in self.input_shape)
        where = f"wrote {self.path}" if self.path is not None else "exported (not written)"
        outputs = ", ".join(self.output_names) if self.postprocess else f"{len(self.output_names)} raw per-level maps"
        lines = [
            f"{where} ({self.num_bytes / 2**20:.1f} MiB, opset {self.opset}): images {shape} float32 RGB in "
            f"[0, 1] -> {outputs}"
        ]
        if self.check is not None:
            lines.extend(self.check.lines())
        else:
            lines.append("check: skipped")
        return "\n".join(lines)


def _check_options(
    model: Any, size: Sequence[int] | None, dynamic: bool, batch: int, opset: int
) -> tuple[int, int] | None:
    if not isinstance(model, FCOSDetector):
        raise UserError(f"model: expected a nasfcos FCOSDetector (got {type(model).__name__})")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"opset: unsupported ONNX opset (got {opset!r}); expected {MIN_OPSET}..{MAX_OPSET}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"batch: must be an integer >= 1 (got {batch!r})")
    if dynamic:
        if size is not None:
            raise UserError(f"size: a fixed size ({size}) and dynamic=True exclude each other; give one")
        if batch != 1:
            raise UserError(f"batch: a dynamic export has a dynamic batch; a fixed batch ({batch}) needs a fixed size")
        return None
    if size is None:
        short = model.test_min_size
        if short is None:
            raise UserError("size: the model does not resize its inputs (min_size=None); give a size or dynamic=True")
        divisor = model.size_divisible
        side = int(math.ceil(short / divisor) * divisor)
        return side, side
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise UserError(f"size: expected (height, width) (got {size!r})") from None
    if height < 32 or width < 32:
        raise UserError(f"size: height and width must be at least 32 pixels (got {height}x{width})")
    return height, width


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warns about every traced shape; keep the caller's output clean."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        yield sink


def _cpu_float_eval(model: FCOSDetector) -> FCOSDetector:
    """The model on the CPU in float32 and eval mode, copying it only when it is elsewhere."""
    params = list(model.parameters())
    on_cpu_f32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    if not on_cpu_f32:
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    return model


def _light_optimize(model: Any) -> None:
    """Constant folding, dead-node removal, deduplication and CSE of the ONNX IR, in place (about a second).

    Why not the exporter's ``optimize=True``: its pattern rewriter took 2-3 minutes on a searched detector here
    and saves nothing these passes do not (ONNX Runtime fuses at load time); these shrink the file by ~16 %.
    """
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)
    for step in (
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
    ):
        step(model)


def _export_bytes(
    graph: DeployGraph,
    example: Tensor,
    output_names: Sequence[str],
    opset: int,
    dynamic_shapes: Any,
    doc: str,
    metadata: Mapping[str, str],
) -> bytes:
    with _quiet() as log:
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table={torch.ops.nasfcos.nms_per_image.default: nms_per_image_onnx},
                external_data=False,
                optimize=False,
                verbose=False,
            )
        except Exception as exc:  # a bug or an unsupported layer: keep the exporter's log with the error
            raise RuntimeError(f"ONNX export failed: {exc}\n--- exporter log ---\n{log.getvalue()}") from exc
    _light_optimize(program.model)
    proto = program.model_proto
    proto.doc_string = doc
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return proto.SerializeToString()


def export_onnx(
    model: FCOSDetector,
    path: str | Path | None,
    *,
    size: Sequence[int] | None = None,
    dynamic: bool = False,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    postprocess: bool = True,
    check: bool = True,
    check_images: Sequence[Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ExportResult:
    """Export ``model`` (an :class:`FCOSDetector`) to ONNX at ``path``; verify it in ONNX Runtime first.

    Args:
        model: the detector; exported in eval mode on the CPU in float32 (copied if it is elsewhere).
        path: the ``.onnx`` file, written atomically and only after the check passed; ``None`` writes nothing
            (the bytes are checked and counted).
        size: ``(height, width)`` of a fixed-size export; default: the model's test short side, square.
        dynamic: dynamic batch, height and width (multiples of ``size_divisible``; see the module docstring).
        batch: the batch of a fixed-size export.
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`.
        postprocess: output ``boxes [D, 4]`` (xyxy, input pixels), ``scores [D]``, ``labels [D]`` and
            ``batch_index [D]`` after NMS; ``False`` outputs the raw per-level maps (``cls_logits_p3`` ...).
        check: run the file in ONNX Runtime and compare with PyTorch (raises :class:`ExportCheckError` and
            writes nothing when they disagree); see :func:`nasfcos.export.check.check_onnx`.
        check_images: ``[3, h, w]`` images in ``[0, 1]`` for the check (resized to the export size); default:
            a few synthetic scenes.
        metadata: extra string ``metadata_props`` for the file (the CLI stores class names and the architecture).

    Raises :class:`~nasfcos.errors.UserError` (one line) for an unsupported option.
    """
    fixed = _check_options(model, size, dynamic, batch, opset)
    model = _cpu_float_eval(model)
    was_training = model.training
    model.eval()
    try:
        graph = DeployGraph(model, postprocess=postprocess, pad=not dynamic).eval()
        divisor = int(model.size_divisible)
        if dynamic:
            dim = torch.export.Dim
            blocks_h = dim("height_blocks", min=DYNAMIC_MIN_BLOCKS, max=DYNAMIC_MAX_BLOCKS)
            blocks_w = dim("width_blocks", min=DYNAMIC_MIN_BLOCKS, max=DYNAMIC_MAX_BLOCKS)
            dynamic_shapes = ({0: dim("batch", min=1, max=_DYNAMIC_MAX_BATCH), 2: divisor * blocks_h, 3: divisor * blocks_w},)
            # Distinct, non-0/1 example sizes so that no dimension is specialised to its example value.
            example = torch.rand(2, 3, divisor * (DYNAMIC_MIN_BLOCKS + 5), divisor * (DYNAMIC_MIN_BLOCKS + 8))
            low, high = divisor * DYNAMIC_MIN_BLOCKS, divisor * DYNAMIC_MAX_BLOCKS
            input_shape: tuple[Any, ...] = ("N", 3, "H", f"W (dynamic; H, W multiples of {divisor} in {low}..{high})")
        else:
            assert fixed is not None
            dynamic_shapes = None
            example = torch.rand(batch, 3, *fixed)
            input_shape = (batch, 3, *fixed)
        output_names = tuple(POSTPROCESS_OUTPUTS if postprocess else raw_output_names(len(model.strides)))
        doc = (
            "nasfcos FCOS detector. Input 'images': float32 [N, 3, H, W] RGB in [0, 1] (normalised inside). "
            + (
                f"Dynamic N, H, W; H and W multiples of {divisor} in [{divisor * DYNAMIC_MIN_BLOCKS}, "
                f"{divisor * DYNAMIC_MAX_BLOCKS}] (pad with the mean colour). "
                if dynamic
                else f"Fixed shape {list(input_shape)}. "
            )
            + (
                "Outputs after NMS: boxes [D, 4] xyxy input pixels, scores [D], labels [D] int64 (0-based), "
                "batch_index [D] int64; grouped by image, scores descending."
                if postprocess
                else "Outputs: raw per-level maps P3..P7: cls_logits (logits), bbox_reg (l, t, r, b distances in "
                "input pixels), centerness (logits)."
            )
        )
        props = {
            "nasfcos.postprocess": json.dumps(postprocess),
            "nasfcos.strides": json.dumps(list(model.strides)),
            "nasfcos.size_divisible": str(divisor),
            "nasfcos.score_thresh": str(model.score_thresh),
            "nasfcos.nms_thresh": str(model.nms_thresh),
            "nasfcos.detections_per_img": str(model.detections_per_img),
            **dict(metadata or {}),
        }
        with torch.no_grad():
            data = _export_bytes(graph, example, output_names, opset, dynamic_shapes, doc, props)
        report = None
        if check:
            batches = default_check_batches(model, fixed, batch, check_images)
            report = check_onnx(model, data, batches, postprocess=postprocess)
            if not report.ok:
                raise ExportCheckError(
                    "the exported graph disagrees with PyTorch; nothing was written:\n" + "\n".join(report.lines())
                )
        written = atomic_write_bytes(path, data) if path is not None else None
        return ExportResult(
            path=written,
            num_bytes=len(data),
            input_shape=input_shape,
            output_names=output_names,
            opset=opset,
            dynamic=dynamic,
            postprocess=postprocess,
            check=report,
        )
    finally:
        model.train(was_training)
