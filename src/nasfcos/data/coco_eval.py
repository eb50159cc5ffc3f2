"""COCO box evaluation with pycocotools, and the conversion from detector outputs to COCO results.

It lives with the data (it reads COCO ground truth and writes COCO results) so that full training, ``nasfcos
eval`` and the search's AP reward all score detections with the same code.

The numbers papers report (AP, AP50, AP75, APs/m/l) are pycocotools' ``COCOeval`` statistics, so evaluation
calls it directly rather than re-implementing it. Around it this module adds what a pipeline needs:
ground truth given as a dict or a file (annotations missing ``area``/``iscrowd``/``id`` — e.g. converted VOC
or synthetic sets — are completed: area = box area, not crowd); detections given as plain lists (an empty list
gives AP 0 instead of pycocotools' crash); its console chatter captured (the summary text is returned); and
one-line ``UserError`` messages for results that do not belong to the ground truth.

Statistics follow pycocotools: ``-1`` means "no ground truth in that category / area range" (e.g. ``APs``
when there are no small objects).

The detector works with contiguous labels ``0..K-1`` and ``xyxy`` boxes; COCO files use the dataset's
category ids and ``xywh`` boxes. :func:`detections_to_coco` converts at that boundary.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, read_json

__all__ = [
    "STAT_NAMES",
    "CocoEvalResult",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate_detections",
    "load_detections",
    "save_detections",
    "save_metrics",
]

#: Names of ``COCOeval.stats`` in order (IoU 0.50:0.95 unless named; AR at 1/10/100 detections per image).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class CocoEvalResult:
    """Metrics by name, pycocotools' printed summary, and AP per category id (``-1`` = no ground truth)."""

    metrics: dict[str, float]
    summary: str = ""
    per_category_ap: dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def _as_list(values: Any) -> list:
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def detections_to_coco(
    outputs: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result dicts from detector outputs.

    ``outputs[i]`` (``boxes`` ``[N, 4]`` xyxy in the original image's pixels, ``scores`` ``[N]``, ``labels``
    ``[N]`` contiguous) belongs to ``image_ids[i]``; label ``k`` becomes ``category_ids[k]``; boxes become
    ``[x, y, w, h]``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"detections_to_coco: {len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = _as_list(output["boxes"])
        scores = _as_list(output["scores"])
        labels = _as_list(output["labels"])
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"detections_to_coco: image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels")
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
            label = int(label)
            if not 0 <= label < len(category_ids):
                raise ValueError(f"detections_to_coco: label {label} outside 0..{len(category_ids) - 1}")
            results.append({
                "image_id": int(image_id),
                "category_id": int(category_ids[label]),
                "bbox": [float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1)],
                "score": float(score),
            })
    return results


# --------------------------------------------------------------------------------------------------------------
# Ground truth and results checking
# --------------------------------------------------------------------------------------------------------------


def _prepare_gt(gt: Mapping[str, Any] | str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """A checked copy of the GT dict with ``id``/``area``/``iscrowd`` filled in, and its name for messages."""
    if isinstance(gt, (str, os.PathLike)):
        source = str(gt)
        data = read_json(gt, what="COCO annotation file")
    else:
        source = "ground truth"
        data = gt
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a COCO annotation object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{source}: missing or malformed '{key}' list; expected a COCO annotation file")
    annotations = []
    used_ids = {ann.get("id") for ann in data["annotations"] if isinstance(ann, Mapping)}
    next_id = max([i for i in used_ids if isinstance(i, int)], default=0) + 1
    seen_ids: set[Any] = set()
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, Mapping) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise UserError(f"{source}: annotations[{index}] needs image_id, category_id and bbox")
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise UserError(f"{source}: annotations[{index}].bbox must be [x, y, w, h] (got {bbox!r})")
        ann = dict(ann)
        ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
        ann.setdefault("iscrowd", 0)
        if ann.get("id") is None or ann["id"] in seen_ids:
            ann["id"] = next_id
            next_id += 1
        seen_ids.add(ann["id"])
        annotations.append(ann)
    prepared = {
        "info": data.get("info", {}),
        "images": list(data["images"]),
        "annotations": annotations,
        "categories": list(data["categories"]),
    }
    return prepared, source


def _prepare_detections(detections: Sequence[Mapping[str, Any]], image_ids: set[int], category_ids: set[int],
                        source: str) -> list[dict[str, Any]]:
    anns = []
    for index, det in enumerate(detections):
        try:
            image_id = int(det["image_id"])
            category_id = int(det["category_id"])
            x, y, w, h = (float(v) for v in det["bbox"])
            score = float(det["score"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{source}[{index}]: expected image_id, category_id, bbox [x, y, w, h] and score "
                            f"(got {det!r:.120})") from None
        if image_id not in image_ids:
            raise UserError(f"{source}[{index}]: image_id {image_id} is not in the ground truth")
        if category_id not in category_ids:
            raise UserError(f"{source}[{index}]: category_id {category_id} is not a ground-truth category "
                            f"(expected one of {sorted(category_ids)[:20]})")
        if not all(math.isfinite(v) for v in (x, y, w, h, score)):
            raise UserError(f"{source}[{index}]: non-finite box or score (got {det!r:.120})")
        w, h = max(w, 0.0), max(h, 0.0)
        anns.append({"id": index + 1, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
                     "score": score, "area": w * h, "iscrowd": 0})
    return anns


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def evaluate_detections(
    gt: Mapping[str, Any] | str | os.PathLike[str],
    detections: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    *,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
) -> CocoEvalResult:
    """Run ``COCOeval`` and return metrics, summary text and per-category AP.

    ``detections`` is a list of ``{image_id, category_id, bbox (xywh), score}`` or a results JSON file.
    ``image_ids`` restricts evaluation to those images (default: every ground-truth image).
    """
    if iou_type != "bbox":
        raise ValueError(f"iou_type {iou_type!r} is not supported; nasfcos evaluates boxes ('bbox')")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_data, gt_source = _prepare_gt(gt)
    det_source = "detections"
    if isinstance(detections, (str, os.PathLike)):
        det_source = str(detections)
        detections = load_detections(detections)
    gt_image_ids = {int(img["id"]) for img in gt_data["images"]}
    gt_category_ids = {int(cat["id"]) for cat in gt_data["categories"]}
    dt_anns = _prepare_detections(detections, gt_image_ids, gt_category_ids, det_source)

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"info": {}, "images": gt_data["images"], "categories": gt_data["categories"],
                           "annotations": dt_anns}
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            unknown = sorted(set(int(i) for i in image_ids) - gt_image_ids)
            if unknown:
                raise UserError(f"{gt_source}: image ids {unknown[:10]} are not in the ground truth")
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
    summary_buffer = io.StringIO()
    with contextlib.redirect_stdout(summary_buffer):
        evaluator.summarize()

    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    return CocoEvalResult(metrics=metrics, summary=summary_buffer.getvalue(),
                          per_category_ap=_per_category_ap(evaluator))


def _per_category_ap(evaluator: Any) -> dict[int, float]:
    """AP@[.5:.95] per category (all areas, 100 detections), ``-1`` where the category has no ground truth."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        valid = values[values > -1]
        result[int(category_id)] = float(np.mean(valid)) if valid.size else -1.0
    return result


def coco_evaluate(
    gt: Mapping[str, Any] | str | os.PathLike[str],
    detections: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    *,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """The 12 ``COCOeval`` statistics by name (:data:`STAT_NAMES`): ``AP``, ``AP50``, ``AP75``, ``APs``, ..."""
    return evaluate_detections(gt, detections, iou_type=iou_type, image_ids=image_ids).metrics


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def save_detections(path: str | os.PathLike[str], detections: Sequence[Mapping[str, Any]]) -> Path:
    """Write a COCO results JSON (a list of detections) atomically."""
    return atomic_write_json(path, [dict(d) for d in detections], indent=None)


def save_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Write metrics (plus whatever the caller adds: checkpoint, step) as JSON atomically."""
    return atomic_write_json(path, dict(metrics))


def load_detections(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a COCO results JSON; anything but a list of objects is a ``UserError``."""
    data = read_json(path, what="COCO results file")
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise UserError(f"{path}: expected a JSON list of detections "
                        "({image_id, category_id, bbox, score} objects)")
    return data
