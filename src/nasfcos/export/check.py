"""Does the ONNX file compute what the PyTorch detector computes? Run both on the same images and compare.

The reference is the detector's own public path, ``model(images)`` (detections) and ``model.forward_raw`` of
``model.preprocess(images)`` (raw maps), with resizing switched off so that both see the same pixels. It shares
no code with the exported graph's post-processing (``detection.postprocess`` vs ``export.graph``) or its
deformable convs (the native gather/GEMM path vs the lowered ``GridSample`` path), so agreement is evidence.

Criteria (stated in every report):

- raw outputs: every element within ``|onnx - torch| <= RAW_ATOL + RAW_RTOL * |torch|``;
- detections, per image: one-to-one matching of every PyTorch detection (in score order) to an unmatched ONNX
  detection of the same label with ``IoU >= MATCH_IOU`` and ``|score difference| <= SCORE_ATOL``, and no
  ONNX detection left over.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nasfcos.detection.detector import FCOSDetector
from nasfcos.export.graph import DYNAMIC_MIN_BLOCKS

__all__ = ["CheckReport", "check_onnx", "default_check_batches", "RAW_ATOL", "RAW_RTOL", "MATCH_IOU", "SCORE_ATOL"]

RAW_ATOL = 1e-4
RAW_RTOL = 1e-3
MATCH_IOU = 0.99
SCORE_ATOL = 1e-3
_CHECK_IMAGES = 3


@dataclass
class CheckReport:
    """The outcome of :func:`check_onnx`; ``lines()`` is what the command prints."""

    ok: bool
    postprocess: bool
    shapes: list[tuple[int, ...]]
    max_abs_diff: float = 0.0  # raw outputs
    worst_fraction: float = 0.0  # max |diff| / (atol + rtol * |ref|) over all raw elements (<= 1 passes)
    num_reference: int = 0  # detections
    num_onnx: int = 0
    num_matched: int = 0
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        images = sum(s[0] for s in self.shapes)
        shapes = ", ".join("x".join(str(d) for d in s) for s in self.shapes)
        head = f"check: ONNX Runtime vs PyTorch on {images} images ({shapes}):"
        verdict = "OK" if self.ok else "FAILED"
        if not self.postprocess:
            body = (
                f"raw outputs max |diff| {self.max_abs_diff:.2e}; tolerance |diff| <= {RAW_ATOL:g} + {RAW_RTOL:g}*|ref| "
                f"(worst element at {self.worst_fraction:.3f} of it)"
            )
        else:
            body = (
                f"{self.num_matched}/{self.num_reference} PyTorch detections matched by {self.num_onnx} ONNX ones "
                f"(same label, IoU >= {MATCH_IOU:g}: min {self.min_iou:.5f}; |score diff| <= {SCORE_ATOL:g}: max "
                f"{self.max_score_diff:.1e})"
            )
            if self.num_reference == 0:
                body += " - no detections to compare on these images"
        return [f"{head} {body}: {verdict}", *(f"  {p}" for p in self.problems)]


@contextlib.contextmanager
def _no_resize(model: FCOSDetector) -> Iterator[None]:
    """Let the detector see the images at their own size (the exported graph does not resize)."""
    saved = model.min_size, model.test_min_size
    model.min_size, model.test_min_size = None, None
    try:
        yield
    finally:
        model.min_size, model.test_min_size = saved


def _synthetic_images(height: int, width: int, count: int, num_classes: int, offset: int) -> list[Tensor]:
    from nasfcos.data.synthetic import render_image, resolve_params

    params = resolve_params(image_size=(height, width), num_classes=max(1, min(6, num_classes)), seed=1234)
    images = []
    for index in range(offset, offset + count):
        pixels, _ = render_image(params, "val", index)
        images.append(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255.0)
    return images


def _resized(images: Sequence[Tensor], height: int, width: int, count: int, offset: int) -> list[Tensor]:
    out = []
    for index in range(offset, offset + count):
        image = images[index % len(images)].float()
        if tuple(image.shape[-2:]) != (height, width):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        out.append(image.clamp(0.0, 1.0))
    return out


def default_check_batches(
    model: FCOSDetector, fixed: tuple[int, int] | None, batch: int, images: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """The batches the built-in check runs: a few images at the fixed size, or two sizes for a dynamic export.

    ``images`` (``[3, h, w]`` in ``[0, 1]``) are resized to each size; default: synthetic scenes.
    """
    if fixed is not None:
        plan = [(batch, fixed)] * max(1, math.ceil(_CHECK_IMAGES / batch))
    else:  # two batch sizes and two sizes (one not square) prove the dynamic axes
        divisor = int(model.size_divisible)
        short = model.test_min_size or 256
        blocks = max(DYNAMIC_MIN_BLOCKS + 1, math.ceil(short / divisor))
        plan = [(2, (blocks * divisor, blocks * divisor)), (1, ((blocks - 1) * divisor, (blocks + 2) * divisor))]
    batches, used = [], 0
    for count, (height, width) in plan:
        if images:
            chosen = _resized(images, height, width, count, used)
        else:
            chosen = _synthetic_images(height, width, count, model.num_classes, used)
        batches.append(torch.stack(chosen))
        used += count
    return batches


def _session(data: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        # Two identical degenerate boxes (zero area) are the same box.
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.all(boxes == box, axis=1) * 1.0)


def _match(report: CheckReport, reference: dict[str, Tensor], boxes: np.ndarray, scores: np.ndarray,
           labels: np.ndarray, where: str) -> None:
    """Greedy one-to-one matching of one image's detections; updates ``report`` counts and problems."""
    ref_boxes = reference["boxes"].numpy().astype(np.float64)
    ref_scores = reference["scores"].numpy().astype(np.float64)
    ref_labels = reference["labels"].numpy()
    free = np.ones(len(boxes), dtype=bool)
    report.num_reference += len(ref_boxes)
    report.num_onnx += len(boxes)
    for i in range(len(ref_boxes)):
        candidates = np.flatnonzero(free & (labels == ref_labels[i]))
        if len(candidates) == 0:
            report.problems.append(f"{where}: PyTorch detection {i} (label {ref_labels[i]}, score {ref_scores[i]:.4f}) has no ONNX counterpart")
            continue
        ious = _iou(ref_boxes[i], boxes[candidates].astype(np.float64))
        best = int(np.argmax(ious))
        j = candidates[best]
        score_diff = abs(float(scores[j]) - ref_scores[i])
        if ious[best] < MATCH_IOU or score_diff > SCORE_ATOL:
            report.problems.append(
                f"{where}: PyTorch detection {i} (label {ref_labels[i]}, score {ref_scores[i]:.4f}): best ONNX match "
                f"IoU {ious[best]:.4f}, score diff {score_diff:.1e}"
            )
            continue
        free[j] = False
        report.num_matched += 1
        report.min_iou = min(report.min_iou, float(ious[best]))
        report.max_score_diff = max(report.max_score_diff, score_diff)
    if free.any():
        report.problems.append(f"{where}: {int(free.sum())} ONNX detections have no PyTorch counterpart")


def check_onnx(model: FCOSDetector, data: bytes, batches: Sequence[Tensor], *, postprocess: bool) -> CheckReport:
    """Run the serialized ONNX model ``data`` in ONNX Runtime on ``batches`` and compare with ``model``."""
    session = _session(data)
    input_name = session.get_inputs()[0].name
    report = CheckReport(ok=True, postprocess=postprocess, shapes=[tuple(b.shape) for b in batches])
    model.eval()
    for number, batch in enumerate(batches):
        outputs = session.run(None, {input_name: batch.numpy().astype(np.float32)})
        with torch.no_grad(), _no_resize(model):
            if postprocess:
                reference = model(list(batch.unbind(0)))
            else:
                padded = model.preprocess(list(batch.unbind(0)))[0]
                raw = model.forward_raw(padded)
                reference = [*raw.cls_logits, *raw.bbox_reg, *raw.centerness]
        if postprocess:
            boxes, scores, labels, image_index = outputs
            for i, ref in enumerate(reference):
                chosen = image_index == i
                _match(report, ref, boxes[chosen], scores[chosen], labels[chosen], f"batch {number} image {i}")
            continue
        for name, got, expected in zip((o.name for o in session.get_outputs()), outputs, reference):
            ref = expected.float().numpy()
            if got.shape != ref.shape:
                report.problems.append(f"batch {number} {name}: shape {got.shape}, PyTorch {ref.shape}")
                continue
            diff = np.abs(got.astype(np.float64) - ref)
            report.max_abs_diff = max(report.max_abs_diff, float(diff.max(initial=0.0)))
            fraction = float((diff / (RAW_ATOL + RAW_RTOL * np.abs(ref))).max(initial=0.0))
            report.worst_fraction = max(report.worst_fraction, fraction)
            if not fraction <= 1.0:  # (NaN fails too)
                report.problems.append(f"batch {number} {name}: max |diff| {float(diff.max()):.2e} beyond the tolerance")
    report.ok = not report.problems
    return report
