"""The FCOS detector: backbone + searched (or hand-designed) decoder, with torchvision's calling contract.

``model(images, targets)`` in training mode returns ``{"loss_cls", "loss_reg", "loss_ctr"}``; in eval mode
``model(images)`` returns one ``{"boxes", "scores", "labels"}`` dict per image with boxes in the pixels of the
image that was passed in. Images are float tensors ``[3, H, W]`` in ``[0, 1]`` of any size; like torchvision's
``GeneralizedRCNNTransform`` the model itself normalises, resizes (short side ``min_size``, long side at most
``max_size``) and pads the batch to a multiple of ``size_divisible``, and scales targets and detections to match.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasfcos.detection.losses import fcos_losses
from nasfcos.detection.points import flatten_levels, level_points
from nasfcos.detection.postprocess import postprocess
from nasfcos.detection.spec import DetectorSpec
from nasfcos.detection.targets import DEFAULT_RANGES, assign_targets_batch
from nasfcos.errors import UserError
from nasfcos.nn.backbones import Backbone, build_backbone
from nasfcos.nn.decoder import Decoder, HeadOutputs
from nasfcos.space.ops import FCOS_MODES, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DetectorSpec", "FCOSDetector", "build_detector", "IMAGENET_MEAN", "IMAGENET_STD", "FCOS_MODES"]


class FCOSDetector(nn.Module):
    """Backbone (``{"c2".."c5"}``) -> :class:`~nasfcos.nn.decoder.Decoder` -> FCOS targets/losses or detections.

    Args:
        backbone: a :class:`~nasfcos.nn.backbones.Backbone`.
        decoder: a :class:`~nasfcos.nn.decoder.Decoder` built for the backbone's channels.
        num_classes: number of object classes ``K`` (labels ``0..K-1``).
        fcos: ``"vanilla"`` (FCOS v1 as NAS-FCOS used it) or ``"improved"`` (centre sampling 1.5, GIoU,
            ``sqrt`` score; the decoder's head must be built with the same mode).
        min_size: short side to resize to; a tuple picks one at random per training image; ``None`` keeps the
            input size.
        test_min_size: short side at inference (default: the last ``min_size``).
        max_size: cap on the long side after resizing.
        size_divisible: the padded batch is a multiple of this (32; 128 gives exact P6/P7 halving).
        image_mean, image_std: normalisation matching the backbone's weights, for inputs in ``[0, 1]``.
        score_thresh, nms_thresh, pre_nms_top_n, detections_per_img: inference settings (FACTS 4).
    """

    def __init__(
        self,
        backbone: Backbone,
        decoder: Decoder,
        num_classes: int,
        *,
        fcos: str = "vanilla",
        min_size: int | Sequence[int] | None = 800,
        max_size: int = 1333,
        size_divisible: int = 32,
        test_min_size: int | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        regress_ranges: Sequence[tuple[float, float]] = DEFAULT_RANGES,
    ) -> None:
        super().__init__()
        if fcos not in FCOS_MODES:
            raise UserError(f"fcos: unknown mode {fcos!r}; expected one of {', '.join(FCOS_MODES)}")
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = int(num_classes)
        self.fcos = fcos
        self.min_size = (min_size,) if isinstance(min_size, int) else (tuple(min_size) if min_size else None)
        self.test_min_size = test_min_size if test_min_size is not None else (self.min_size[-1] if self.min_size else None)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(3, 1, 1), persistent=False)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.pre_nms_top_n = pre_nms_top_n
        self.detections_per_img = detections_per_img
        self.regress_ranges = tuple(tuple(r) for r in regress_ranges)
        self.spec: DetectorSpec | None = None  # set by build_detector: what to save with the weights

    @property
    def strides(self) -> tuple[int, ...]:
        return self.decoder.strides

    # ------------------------------------------------------------------ pre-processing
    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.min_size is None:
            return height, width
        short = random.choice(self.min_size) if self.training else self.test_min_size
        scale = min(short / min(height, width), self.max_size / max(height, width))
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def preprocess(
        self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[tuple[float, float]], list[tuple[int, int]], list[dict]]:
        """Normalise, resize and pad ``images``; scale ``targets`` with them.

        Returns ``(batch, image_sizes, scale_factors (sx, sy), original_sizes, scaled_targets)``.
        """
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images: expected a list of [3, H, W] tensors or an [N, 3, H, W] tensor, got {tuple(images.shape)}")
            images = list(images.unbind(0))
        if len(images) == 0:
            raise ValueError("images: empty batch")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"targets: {len(targets)} entries for {len(images)} images")
        resized: list[Tensor] = []
        sizes: list[tuple[int, int]] = []
        scales: list[tuple[float, float]] = []
        originals: list[tuple[int, int]] = []
        scaled_targets: list[dict] = []
        for index, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images[{index}]: expected [3, H, W], got {tuple(image.shape)}")
            height, width = int(image.shape[-2]), int(image.shape[-1])
            new_h, new_w = self._target_size(height, width)
            image = (image.to(self.image_mean.dtype) - self.image_mean) / self.image_std
            if (new_h, new_w) != (height, width):
                image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
            sx, sy = new_w / width, new_h / height
            resized.append(image)
            sizes.append((new_h, new_w))
            scales.append((sx, sy))
            originals.append((height, width))
            if targets is not None:
                target = dict(targets[index])
                boxes = target["boxes"].to(image.dtype)
                target["boxes"] = boxes * boxes.new_tensor([sx, sy, sx, sy])
                target["labels"] = target["labels"].to(torch.int64)
                scaled_targets.append(target)
        divisor = self.size_divisible
        max_h = int(math.ceil(max(h for h, _ in sizes) / divisor) * divisor)
        max_w = int(math.ceil(max(w for _, w in sizes) / divisor) * divisor)
        batch = resized[0].new_zeros((len(resized), 3, max_h, max_w))
        for slot, image in zip(batch, resized):
            slot[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batch, sizes, scales, originals, scaled_targets

    # ------------------------------------------------------------------ forward passes
    def forward_raw(self, batch: Tensor) -> HeadOutputs:
        """Raw per-level outputs for an already normalised, padded ``[N, 3, H, W]`` batch."""
        return self.decoder(self.backbone(batch))

    def points_for(self, outputs: HeadOutputs) -> list[Tensor]:
        sizes = [tuple(level.shape[-2:]) for level in outputs.cls_logits]
        reference = outputs.cls_logits[0]
        return level_points(sizes, self.strides, device=reference.device, dtype=torch.float32)

    def compute_losses(self, outputs: HeadOutputs, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """FCOS losses of raw ``outputs`` against ``targets`` (boxes in the padded batch's pixels)."""
        points = self.points_for(outputs)
        assigned = assign_targets_batch(
            points,
            [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets],
            self.strides,
            ranges=self.regress_ranges,
            center_sampling_radius=1.5 if self.fcos == "improved" else None,
            normalize_by_stride=False,
        )
        return fcos_losses(
            flatten_levels(outputs.cls_logits).float(),
            flatten_levels(outputs.bbox_reg).float(),
            flatten_levels(outputs.centerness).float().squeeze(-1),
            assigned,
            mode=self.fcos,
        )

    def detect(
        self,
        outputs: HeadOutputs,
        image_sizes: Sequence[tuple[int, int]],
        scale_factors: Sequence[tuple[float, float]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections from raw outputs, in original-image pixels when ``scale_factors`` are given."""
        return postprocess(
            [c.float() for c in outputs.cls_logits],
            [b.float() for b in outputs.bbox_reg],
            [c.float() for c in outputs.centerness],
            self.points_for(outputs),
            image_sizes,
            score_thresh=self.score_thresh,
            pre_nms_top_n=self.pre_nms_top_n,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
            sqrt_score=self.fcos == "improved",
            scale_factors=scale_factors,
            original_sizes=original_sizes,
        )

    def forward(
        self, images: Sequence[Tensor] | Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("targets: required in training mode (call model.eval() for inference)")
        batch, sizes, scales, originals, scaled = self.preprocess(images, targets if self.training else None)
        if next(self.parameters()).is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        outputs = self.forward_raw(batch)
        if self.training:
            return self.compute_losses(outputs, scaled)
        return self.detect(outputs, sizes, scales, originals)


def build_detector(arch: DetectorSpec | Any, *, pretrained: str | Path | None = None, **options: Any) -> FCOSDetector:
    """Assemble a complete FCOS detector from a :class:`~nasfcos.detection.spec.DetectorSpec`.

    ``build_detector(spec)`` builds exactly what ``spec`` describes (how ``nasfcos eval`` and ``predict``
    rebuild a trained model). ``build_detector(arch, **options)`` is shorthand for
    ``build_detector(DetectorSpec.resolve(arch, **options))``:

    Args:
        arch: a preset name (``nasfcos.PRESETS``, optionally with widths: ``"nas-fcos@128-256"``), a path to a
            genotype JSON file, or a ``Genotype``.
        options: any :class:`DetectorSpec` field: ``backbone`` (``resnet18``, ``resnet50``, ``resnet101``,
            ``resnext101_32x4d``, ``mobilenet_v2``), ``num_classes``, ``fpn_width``/``head_width`` (``None``:
            the arch's suffix or preset; an explicit width that contradicts the suffix is a ``UserError``),
            ``fcos``, ``concat``, ``freeze_at``/``frozen_bn``, ``min_size``/``test_min_size``/``max_size``/
            ``size_divisible`` (resizing and padding done by the model) and the inference settings
            ``score_thresh``, ``nms_thresh``, ``pre_nms_top_n``, ``detections_per_img``.
        pretrained: local ImageNet weights file for the backbone (torchvision or timm format); nothing is
            downloaded. Not part of the spec: a trained model's weights replace it.
    """
    if isinstance(arch, DetectorSpec):
        if options:
            raise TypeError(f"build_detector: give a DetectorSpec or an arch with options, not both "
                            f"(got {', '.join(sorted(options))})")
        spec = arch
    else:
        spec = DetectorSpec.resolve(arch, **options)
    body = build_backbone(spec.backbone, weights=pretrained, freeze_at=spec.freeze_at, frozen_bn=spec.frozen_bn)
    decoder = Decoder(spec.genotype, body.out_channels, spec.num_classes, **spec.decoder_options())
    detector = FCOSDetector(body, decoder, spec.num_classes, **spec.detector_options())
    detector.spec = spec
    return detector
