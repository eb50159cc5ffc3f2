"""The three FCOS losses (classification, box regression, centerness) and how they are normalised.

Two flavours (FACTS 4):

* ``"vanilla"`` — FCOS v1 as NAS-FCOS trains it: sigmoid focal loss summed / (num_pos + num_images), IoU loss
  ``-log((I + 1) / (U + 1))`` weighted by the centerness targets (weighted mean), centerness BCE averaged over
  positives. All normalisers are per process.
* ``"improved"`` — later FCOS: GIoU loss ``1 - GIoU``, and the focal sum divided by ``max(num_pos, 1)`` where
  ``num_pos`` (and the sum of regression weights) is averaged over processes when ``torch.distributed`` is
  initialised, so every GPU normalises by the same number.

Predictions come flattened over levels (``points.flatten_levels``): class logits ``[N, P, K]``, box distances
``[N, P, 4]`` (positive ``l, t, r, b``), centerness logits ``[N, P]``; targets are a batched
:class:`~nasfcos.detection.targets.FCOSTargets`. The box targets must be in the same unit as the predicted
distances (pixels when the head outputs pixels: assign with ``normalize_by_stride=False``). Losses are
computed in float32 even under autocast. With no positive point the regression and centerness losses are
exactly 0, finite and still attached to the graph (the empty selection of predictions back-propagates zeros).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from nasfcos.detection.targets import FCOSTargets

__all__ = ["sigmoid_focal_loss", "iou_loss", "fcos_losses", "FCOSLoss"]

Mode = Literal["vanilla", "improved"]
Normalizer = Literal["num_pos_plus_images", "num_pos"]

_EPS = 1e-7


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """RetinaNet's sigmoid focal loss (torchvision's implementation); ``targets`` are 0/1 one-hot floats."""
    return torchvision.ops.sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha, gamma, reduction)


def iou_loss(
    pred_ltrb: Tensor,
    target_ltrb: Tensor,
    weight: Tensor | None = None,
    kind: Literal["iou", "giou"] = "iou",
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """IoU-type loss between boxes given as distances ``(l, t, r, b)`` from the same point.

    Args:
        pred_ltrb, target_ltrb: ``[..., 4]`` non-negative distances.
        weight: optional ``[...]`` per-box weights (FCOS: the centerness targets).
        kind: ``"iou"`` — UnitBox/FCOS v1 ``-log((I + 1) / (U + 1))`` (the +1 keeps tiny boxes finite);
            ``"giou"`` — ``1 - GIoU`` with exact GIoU (no +1 smoothing, so it is scale invariant).
        reduction: ``"none"`` per-box (weighted) losses; ``"sum"`` ``sum(w * l)``; ``"mean"`` the weighted
            mean ``sum(w * l) / sum(w)`` (plain mean without weights; 0 for no boxes or all-zero weights).
    """
    pl, pt, pr, pb = pred_ltrb.unbind(dim=-1)
    tl, tt, tr, tb = target_ltrb.unbind(dim=-1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (torch.minimum(pt, tt) + torch.minimum(pb, tb))
    union = pred_area + target_area - inter
    if kind == "iou":
        losses = -torch.log((inter + 1.0) / (union + 1.0))
    elif kind == "giou":
        enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb))
        iou = inter / union.clamp(min=_EPS)
        giou = iou - (enclose - union) / enclose.clamp(min=_EPS)
        losses = 1.0 - giou
    else:
        raise ValueError(f"iou_loss: kind must be 'iou' or 'giou' (got {kind!r})")

    if weight is not None:
        losses = losses * weight
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        denominator = weight.sum() if weight is not None else losses.new_tensor(float(losses.numel()))
        return losses.sum() / denominator.clamp(min=_EPS)
    raise ValueError(f"iou_loss: reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")


def _mean_over_processes(value: Tensor) -> Tensor:
    """``value`` averaged over all ``torch.distributed`` processes (unchanged when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / torch.distributed.get_world_size()
    return value.detach()


def fcos_losses(
    cls_logits: Tensor,
    bbox_reg: Tensor,
    centerness: Tensor,
    targets: FCOSTargets,
    *,
    mode: Mode = "vanilla",
    normalizer: Normalizer | None = None,
    reg_loss: Literal["iou", "giou"] | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """FCOS training losses for a batch.

    Args:
        cls_logits: ``[N, P, K]`` class logits.
        bbox_reg: ``[N, P, 4]`` predicted distances ``(l, t, r, b)`` (same unit as ``targets.reg``).
        centerness: ``[N, P]`` (or ``[N, P, 1]``) centerness logits.
        targets: batched :class:`FCOSTargets` (``labels [N, P]`` with ``-1`` background, ``reg [N, P, 4]``,
            ``centerness [N, P]``).
        mode: ``"vanilla"`` (FCOS v1: IoU loss, per-process ``num_pos + num_images``) or ``"improved"``
            (GIoU, ``max(num_pos, 1)`` averaged over processes).
        normalizer: override the mode's choice: ``"num_pos_plus_images"`` (per process) or ``"num_pos"``
            (averaged over processes; the regression-weight sum and the centerness normaliser too).
        reg_loss: override the mode's IoU kind.

    Returns:
        ``{"loss_cls", "loss_reg", "loss_ctr"}`` scalar tensors.
    """
    if mode not in ("vanilla", "improved"):
        raise ValueError(f"fcos_losses: mode must be 'vanilla' or 'improved' (got {mode!r})")
    if normalizer is None:
        normalizer = "num_pos_plus_images" if mode == "vanilla" else "num_pos"
    if normalizer not in ("num_pos_plus_images", "num_pos"):
        raise ValueError(f"fcos_losses: normalizer must be 'num_pos_plus_images' or 'num_pos' (got {normalizer!r})")
    if reg_loss is None:
        reg_loss = "iou" if mode == "vanilla" else "giou"

    num_images, num_points, num_classes = cls_logits.shape
    if bbox_reg.shape != (num_images, num_points, 4):
        raise ValueError(f"fcos_losses: bbox_reg must be [N, P, 4] = {[num_images, num_points, 4]} "
                         f"(got {list(bbox_reg.shape)})")
    centerness = centerness.reshape(num_images, num_points)
    labels = targets.labels.reshape(-1).to(cls_logits.device)
    if labels.numel() != num_images * num_points:
        raise ValueError(f"fcos_losses: targets have {labels.numel()} points, predictions {num_images * num_points}")

    logits = cls_logits.reshape(-1, num_classes).float()
    positive = labels >= 0
    # F.one_hot itself rejects a label >= num_classes.
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).to(logits.dtype) * positive[:, None].to(logits.dtype)
    focal = sigmoid_focal_loss(logits, one_hot, focal_alpha, focal_gamma, reduction="sum")

    num_pos = positive.sum().to(logits.dtype)
    if normalizer == "num_pos_plus_images":
        cls_norm = num_pos + num_images
        ctr_norm = num_pos.clamp(min=1.0)
    else:
        cls_norm = _mean_over_processes(num_pos).clamp(min=1.0)
        ctr_norm = cls_norm

    reg_pred = bbox_reg.reshape(-1, 4)[positive].float()
    reg_target = targets.reg.reshape(-1, 4).to(reg_pred)[positive]
    ctr_target = targets.centerness.reshape(-1).to(reg_pred)[positive]
    ctr_pred = centerness.reshape(-1)[positive].float()

    reg_sum = iou_loss(reg_pred, reg_target, weight=ctr_target, kind=reg_loss, reduction="sum")
    weight_sum = ctr_target.sum()
    if normalizer == "num_pos":
        weight_sum = _mean_over_processes(weight_sum)
    loss_reg = reg_sum / weight_sum.detach().clamp(min=_EPS)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred, ctr_target, reduction="sum") / ctr_norm

    return {"loss_cls": focal / cls_norm, "loss_reg": loss_reg, "loss_ctr": loss_ctr}


class FCOSLoss(nn.Module):
    """Module form of :func:`fcos_losses` with the options fixed at construction.

    ``FCOSLoss(num_classes, mode="vanilla"|"improved", normalizer=None)``; ``forward(cls_logits [N,P,K],
    bbox_reg [N,P,4], centerness [N,P], targets: FCOSTargets) -> {"loss_cls", "loss_reg", "loss_ctr"}``.
    """

    def __init__(
        self,
        num_classes: int,
        mode: Mode = "vanilla",
        normalizer: Normalizer | None = None,
        reg_loss: Literal["iou", "giou"] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if mode not in ("vanilla", "improved"):
            raise ValueError(f"FCOSLoss: mode must be 'vanilla' or 'improved' (got {mode!r})")
        self.num_classes = int(num_classes)
        self.mode = mode
        self.normalizer = normalizer
        self.reg_loss = reg_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self, cls_logits: Tensor, bbox_reg: Tensor, centerness: Tensor, targets: FCOSTargets
    ) -> dict[str, Tensor]:
        if cls_logits.shape[-1] != self.num_classes:
            raise ValueError(f"FCOSLoss: expected {self.num_classes} classes, logits have {cls_logits.shape[-1]}")
        return fcos_losses(
            cls_logits,
            bbox_reg,
            centerness,
            targets,
            mode=self.mode,
            normalizer=self.normalizer,
            reg_loss=self.reg_loss,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mode={self.mode!r}, normalizer={self.normalizer!r}"
