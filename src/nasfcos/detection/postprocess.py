"""Turn FCOS head outputs into detections: threshold, top-k, decode, clip, class-aware NMS, cap, rescale.

FCOS inference (FACTS 4), per image:

1. per level, keep (point, class) pairs with ``sigmoid(cls) > score_thresh`` (0.05) — the threshold is on the
   class probability alone, as in FCOS;
2. score them ``sigmoid(cls) * sigmoid(centerness)`` (``sqrt`` of that product with ``sqrt_score``, the
   improved FCOS) and keep the ``pre_nms_top_n`` (1000) best of the level — ranked by that final score, as the
   released FCOS code does (the square root does not change the order);
3. decode ``(x - l, y - t, x + r, y + b)`` from the point and the predicted distances (input pixels) and clip
   to the un-padded image size ``(h, w)`` (coordinates in ``[0, w]`` x ``[0, h]``, torchvision's convention);
4. class-aware NMS over all levels at IoU ``nms_thresh`` (0.6) and keep the ``detections_per_img`` (100)
   highest scores;
5. optionally map to the original image: divide by the per-image resize factors ``(sx, sy)`` and clip to the
   original size.

Thresholding, top-k and decoding are batched over images; NMS runs once for the whole batch (image index
folded into the class-aware grouping).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["postprocess"]


def _clip(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip xyxy ``boxes [D, 4]`` to per-box image sizes (``heights``, ``widths`` ``[D]``)."""
    zero = torch.zeros_like(widths)
    x0 = torch.minimum(torch.maximum(boxes[:, 0], zero), widths)
    y0 = torch.minimum(torch.maximum(boxes[:, 1], zero), heights)
    x1 = torch.minimum(torch.maximum(boxes[:, 2], zero), widths)
    y1 = torch.minimum(torch.maximum(boxes[:, 3], zero), heights)
    return torch.stack((x0, y0, x1, y1), dim=1)


def postprocess(
    cls_logits: Sequence[Tensor],
    bbox_reg: Sequence[Tensor],
    centerness: Sequence[Tensor],
    points: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    *,
    score_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    sqrt_score: bool = False,
    scale_factors: Sequence[tuple[float, float]] | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Tensor]]:
    """Detections for a batch from per-level head outputs.

    Args:
        cls_logits: per level ``[N, K, H, W]`` class logits.
        bbox_reg: per level ``[N, 4, H, W]`` positive distances ``(l, t, r, b)`` in input pixels.
        centerness: per level ``[N, 1, H, W]`` centerness logits.
        points: per level ``[H*W, 2]`` point coordinates (:func:`~nasfcos.detection.points.level_points`).
        image_sizes: per image ``(h, w)`` of the image inside the (padded) input, for clipping.
        score_thresh, pre_nms_top_n, nms_thresh, detections_per_img: see the module docstring.
        sqrt_score: score ``sqrt(cls * centerness)`` (improved FCOS) instead of ``cls * centerness``.
        scale_factors: per image ``(sx, sy)`` resize factors (input size / original size); boxes are divided
            by them to return original-image pixels.
        original_sizes: per image original ``(h, w)`` to clip to after rescaling; default
            ``round(h / sy), round(w / sx)``.

    Returns:
        Per image ``{"boxes": [D, 4] float xyxy, "scores": [D], "labels": [D] int64}``, scores descending,
        ``D <= detections_per_img``.
    """
    num_levels = len(cls_logits)
    if not (len(bbox_reg) == len(centerness) == len(points) == num_levels) or num_levels == 0:
        raise ValueError(
            f"postprocess: got {len(cls_logits)} cls, {len(bbox_reg)} reg, {len(centerness)} centerness and "
            f"{len(points)} points levels; expected the same non-zero number"
        )
    num_images, num_classes = cls_logits[0].shape[:2]
    if len(image_sizes) != num_images:
        raise ValueError(f"postprocess: {len(image_sizes)} image sizes for {num_images} images")
    device = cls_logits[0].device
    sizes = torch.as_tensor([[float(h), float(w)] for h, w in image_sizes], device=device)

    level_boxes, level_scores, level_labels, level_images = [], [], [], []
    for cls, reg, ctr, pts in zip(cls_logits, bbox_reg, centerness, points):
        n, k, height, width = cls.shape
        hw = height * width
        if pts.shape[0] != hw or reg.shape != (n, 4, height, width) or ctr.shape != (n, 1, height, width):
            raise ValueError(
                f"postprocess: level shapes disagree: cls {tuple(cls.shape)}, reg {tuple(reg.shape)}, "
                f"centerness {tuple(ctr.shape)}, points {tuple(pts.shape)}"
            )
        probs = cls.float().permute(0, 2, 3, 1).reshape(n, hw * k).sigmoid()
        ctr_probs = ctr.float().reshape(n, hw).sigmoid()
        scores = (probs.reshape(n, hw, k) * ctr_probs[:, :, None]).reshape(n, hw * k)
        candidate = probs > score_thresh
        ranked = torch.where(candidate, scores, torch.full_like(scores, -1.0))
        top_scores, top_index = ranked.topk(min(int(pre_nms_top_n), hw * k), dim=1)
        image_index, slot = candidate.gather(1, top_index).nonzero(as_tuple=True)
        flat = top_index[image_index, slot]
        point_index = torch.div(flat, k, rounding_mode="floor")
        labels = flat % k
        dist = reg.float().permute(0, 2, 3, 1).reshape(n, hw, 4)[image_index, point_index]
        xy = pts.to(device=device, dtype=torch.float32)[point_index]
        boxes = torch.cat((xy - dist[:, :2], xy + dist[:, 2:]), dim=1)
        level_boxes.append(_clip(boxes, sizes[image_index, 0], sizes[image_index, 1]))
        level_scores.append(top_scores[image_index, slot])
        level_labels.append(labels)
        level_images.append(image_index)

    boxes = torch.cat(level_boxes)
    scores = torch.cat(level_scores)
    labels = torch.cat(level_labels)
    images = torch.cat(level_images)
    if sqrt_score:
        scores = scores.sqrt()

    keep = batched_nms(boxes, scores, images * num_classes + labels, nms_thresh)  # sorted by score, descending
    kept_images = images[keep]

    results = []
    for i in range(num_images):
        selected = keep[kept_images == i][: int(detections_per_img)]
        image_boxes = boxes[selected]
        if scale_factors is not None:
            sx, sy = (float(v) for v in scale_factors[i])
            image_boxes = image_boxes / image_boxes.new_tensor([sx, sy, sx, sy])
            if original_sizes is not None:
                orig_h, orig_w = (float(v) for v in original_sizes[i])
            else:
                orig_h = float(round(float(image_sizes[i][0]) / sy))
                orig_w = float(round(float(image_sizes[i][1]) / sx))
            count = image_boxes.shape[0]
            image_boxes = _clip(
                image_boxes,
                image_boxes.new_full((count,), orig_h),
                image_boxes.new_full((count,), orig_w),
            )
        elif original_sizes is not None:
            raise ValueError("postprocess: original_sizes needs scale_factors")
        results.append({"boxes": image_boxes, "scores": scores[selected], "labels": labels[selected]})
    return results
