"""The module that is exported: an FCOS detector as one graph from ``[0, 1]`` RGB pixels to detections.

:class:`DeployGraph` wraps a trained :class:`~nasfcos.detection.detector.FCOSDetector` so that everything
between the deployed program's pixels and its boxes is inside the ONNX file:

- normalisation with the detector's mean/std, and (fixed sizes) zero padding to a multiple of the detector's
  ``size_divisible``, exactly what ``FCOSDetector.preprocess`` does when it does not resize;
- backbone, searched FPN and head (deformable convs lowered by ``nasfcos.nn._deform_export``);
- either the raw per-level outputs, or FCOS post-processing written with fixed-shape tensor ops (threshold by
  masking, per-level top-k, decoding, clipping) and one ONNX ``NonMaxSuppression`` per image (through the custom
  op :func:`nms_per_image`, which the exporter translates to that node).

Why a separate formulation of the post-processing: ``detection.postprocess`` filters with boolean indexing
before the top-k and calls torchvision's flat ``batched_nms``, which exports as a single-batch NMS and needs
data-dependent shapes at every step. Here the only data-dependent size is NMS's output, and ONNX's per-batch
``max_output_boxes_per_class`` caps the detections per image the way ``detections_per_img`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.detection.detector import FCOSDetector

__all__ = [
    "DeployGraph",
    "nms_per_image",
    "raw_output_names",
    "POSTPROCESS_OUTPUTS",
    "INVALID_SCORE",
    "DYNAMIC_MIN_BLOCKS",
    "DYNAMIC_MAX_BLOCKS",
]

POSTPROCESS_OUTPUTS = ("boxes", "scores", "labels", "batch_index")
INVALID_SCORE = -1.0  # score of a (point, class) that fails the class-probability threshold
_NMS_SCORE_THRESHOLD = -0.5  # between INVALID_SCORE and every real score (>= 0): NMS drops exactly the invalid
_LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")
# Sizes a dynamic export accepts, in multiples of the detector's size_divisible (why: ``exporter``'s docstring).
DYNAMIC_MIN_BLOCKS = 5  # 160 px at 32: P7 at least 2x2
DYNAMIC_MAX_BLOCKS = 128  # 4096 px at 32


def raw_output_names(num_levels: int = 5) -> list[str]:
    """Names of the raw outputs: ``cls_logits_p3..p7``, ``bbox_reg_p3..p7``, ``centerness_p3..p7``."""
    levels = _LEVEL_NAMES[:num_levels]
    return [f"{kind}_{level}" for kind in ("cls_logits", "bbox_reg", "centerness") for level in levels]


@torch.library.custom_op("nasfcos::nms_per_image", mutates_args=())
def nms_per_image(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_image: int
) -> Tensor:
    """Greedy NMS of every image separately: ``[S, 2]`` int64 rows ``(image, box index)``.

    ``boxes [N, M, 4]`` xyxy, ``scores [N, M]``; boxes scoring ``<= score_threshold`` are ignored; per image the
    kept boxes come in descending score order, at most ``max_per_image`` of them. Suppression is by
    ``IoU > iou_threshold`` (torchvision's and ONNX's rule). Exported as one ONNX ``NonMaxSuppression``.
    """
    from torchvision.ops import nms

    rows = []
    for image in range(boxes.shape[0]):
        candidates = (scores[image] > score_threshold).nonzero().squeeze(1)
        keep = nms(boxes[image, candidates], scores[image, candidates], iou_threshold)[:max_per_image]
        index = candidates[keep]
        rows.append(torch.stack((torch.full_like(index, image), index), dim=1))
    if not rows:
        return boxes.new_zeros((0, 2), dtype=torch.int64)
    return torch.cat(rows)


@nms_per_image.register_fake
def _nms_per_image_fake(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_image: int
) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 2), dtype=torch.int64)


def nms_per_image_onnx(boxes, scores, iou_threshold: float, score_threshold: float, max_per_image: int):  # type: ignore[no-untyped-def]
    """ONNX translation of :func:`nms_per_image` (onnxscript): one ``NonMaxSuppression`` over the batch."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(  # [S, 3]: (batch, class, box); one class, so columns 0 and 2
        boxes,
        op.Unsqueeze(scores, [1]),
        op.Constant(value_ints=[int(max_per_image)]),
        op.Constant(value_floats=[float(iou_threshold)]),
        op.Constant(value_floats=[float(score_threshold)]),
        center_point_box=0,
    )
    return op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)


def _clip(boxes: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Clip xyxy ``boxes [..., 4]`` to ``[0, width] x [0, height]`` (0-d tensors), torchvision's convention."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    zero = torch.zeros_like(x0)
    return torch.stack(
        (
            torch.minimum(torch.maximum(x0, zero), width),
            torch.minimum(torch.maximum(y0, zero), height),
            torch.minimum(torch.maximum(x1, zero), width),
            torch.minimum(torch.maximum(y1, zero), height),
        ),
        dim=-1,
    )


class DeployGraph(nn.Module):
    """``images [N, 3, H, W]`` RGB in ``[0, 1]`` -> raw per-level outputs, or ``boxes, scores, labels, batch_index``.

    Args:
        detector: the trained detector (its normalisation, strides and inference settings are used).
        postprocess: return detections (``boxes [D, 4]`` xyxy in input pixels, ``scores [D]``, ``labels [D]``
            int64, ``batch_index [D]`` int64, grouped by image, scores descending within an image) instead of
            the 15 raw maps (:func:`raw_output_names`).
        pad: pad the normalised batch with zeros to a multiple of ``detector.size_divisible`` inside the graph
            (fixed-size exports); dynamic exports take sizes that already are multiples.
    """

    def __init__(self, detector: FCOSDetector, *, postprocess: bool, pad: bool) -> None:
        super().__init__()
        self.detector = detector
        self.postprocess = postprocess
        self.pad = pad

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        detector = self.detector
        height, width = images.shape[-2], images.shape[-1]
        x = (images - detector.image_mean) / detector.image_std
        if self.pad:
            divisor = detector.size_divisible
            x = F.pad(x, (0, (-width) % divisor, 0, (-height) % divisor))
        outputs = detector.forward_raw(x)
        if not self.postprocess:
            return (*outputs.cls_logits, *outputs.bbox_reg, *outputs.centerness)
        return self._detect(outputs.cls_logits, outputs.bbox_reg, outputs.centerness, height, width)

    def _detect(
        self, cls_logits: list[Tensor], bbox_reg: list[Tensor], centerness: list[Tensor], height, width  # type: ignore[no-untyped-def]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """FCOS inference (see ``detection.postprocess``) with masks instead of filtering, then per-image NMS."""
        detector = self.detector
        level_boxes, level_scores, level_labels = [], [], []
        reference = cls_logits[0]
        limit_h = reference.new_zeros(()) + height
        limit_w = reference.new_zeros(()) + width
        for cls, reg, ctr, stride in zip(cls_logits, bbox_reg, centerness, detector.strides):
            n, k, h, w = cls.shape
            hw = h * w
            probs = cls.permute(0, 2, 3, 1).reshape(n, hw, k).sigmoid()
            ctr_probs = ctr.reshape(n, hw, 1).sigmoid()
            scores = (probs * ctr_probs).reshape(n, hw * k)
            ranked = torch.where(probs.reshape(n, hw * k) > detector.score_thresh, scores, INVALID_SCORE)
            top_scores, top_index = ranked.topk(torch.sym_min(int(detector.pre_nms_top_n), hw * k), dim=1)
            point = torch.div(top_index, k, rounding_mode="floor")
            labels = top_index - point * k
            dist = reg.permute(0, 2, 3, 1).reshape(n, hw, 4)
            dist = torch.gather(dist, 1, point[:, :, None].expand(-1, -1, 4))
            xs = torch.arange(w, device=cls.device, dtype=dist.dtype) * stride + stride // 2
            ys = torch.arange(h, device=cls.device, dtype=dist.dtype) * stride + stride // 2
            px = xs[point - torch.div(point, w, rounding_mode="floor") * w]
            py = ys[torch.div(point, w, rounding_mode="floor")]
            boxes = torch.stack((px - dist[..., 0], py - dist[..., 1], px + dist[..., 2], py + dist[..., 3]), dim=-1)
            level_boxes.append(_clip(boxes, limit_h, limit_w))
            level_scores.append(top_scores)
            level_labels.append(labels)
        boxes = torch.cat(level_boxes, dim=1)  # [N, M, 4]
        scores = torch.cat(level_scores, dim=1)  # [N, M]
        labels = torch.cat(level_labels, dim=1)
        if detector.fcos == "improved":  # sqrt(cls * ctr); invalid entries stay below the NMS threshold
            scores = torch.where(scores >= 0, scores.clamp(min=0).sqrt(), INVALID_SCORE)
        # Class-aware NMS by the coordinate offset trick (as torchvision's batched_nms): boxes are clipped to the
        # image, so shifting each class by more than the image's larger side keeps classes from overlapping.
        shift = labels.to(boxes.dtype) * (torch.maximum(limit_h, limit_w) + 1.0)
        keep = nms_per_image(
            boxes + shift[..., None],
            scores,
            float(detector.nms_thresh),
            _NMS_SCORE_THRESHOLD,
            int(detector.detections_per_img),
        )
        image_index, box_index = keep[:, 0], keep[:, 1]
        return (
            boxes[image_index, box_index],
            scores[image_index, box_index],
            labels[image_index, box_index],
            image_index,
        )
