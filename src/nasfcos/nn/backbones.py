"""Backbones: C2..C5 feature extractors built from torchvision's model definitions.

FCOS (and so NAS-FCOS) reads four backbone stages at strides 4, 8, 16, 32 and calls them ``c2..c5``. We build
the networks from torchvision's classes without downloading anything (``weights=None``); pretrained weights
come from a local file in torchvision or timm layout (see :func:`load_backbone_weights`).

Names and taps:

- ``resnet18``, ``resnet50``, ``resnet101``: torchvision's ResNets; ``c2..c5`` = outputs of ``layer1..layer4``.
- ``resnext101_32x4d``: ResNeXt-101 with 32 groups of width 4 (the X-101 of the paper's Table 2). torchvision
  ships only 32x8d and 64x4d, so it is built from torchvision's ``ResNet`` + ``Bottleneck`` with
  ``groups=32, width_per_group=4`` (same tensor names as torchvision's ResNeXts, so such weights load).
- ``resnext101_32x8d``: torchvision's ResNeXt-101 32x8d. Not in the paper's caption, but it is what the released
  X-101 configs (``R_101_X_32x8d_...``) and FCOS's official X-101 model use, and what Table 2's X-101 numbers
  (94.9M params, 387.7 GFLOPs) correspond to; see ``docs/table2.md``.
- ``mobilenet_v2``: torchvision's MobileNetV2 ``features``; taps after ``features[3]`` (24 ch, stride 4),
  ``features[6]`` (32 ch, stride 8), ``features[13]`` (96 ch, stride 16) and ``features[17]`` (320 ch,
  stride 32) — the last block of each stride, which are the indices FCOS's MobileNetV2 returns
  (``return_features_indices = [3, 6, 13, 17]``). The final 1x1 conv to 1280 channels (``features[18]``) and
  the classifier are not part of the backbone.

Freezing (``freeze_at``) follows FCOS's ``FREEZE_CONV_BODY_AT``: 0 freezes nothing, 1 the stem, 2 the stem and
the first stage (the FCOS default), ... 5 everything. For MobileNetV2 the "stem" is everything at stride 2
(``features[0:2]``) and stage k is the blocks between two taps, so ``freeze_at=2`` freezes ``features[0:4]``
(FCOS's own MobileNetV2 freezes only ``features[0:2]`` at its default; we keep one meaning for every backbone).
``frozen_bn=True`` swaps every ``BatchNorm2d`` for :class:`torchvision.ops.FrozenBatchNorm2d` with the same
statistics and affine values — the usual choice when the per-GPU detection batch is too small for BN.
"""

from __future__ import annotations

import abc

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models import resnet101 as tv_resnet101
from torchvision.models import resnext101_32x8d as tv_resnext101_32x8d
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

from nasfcos.errors import UserError
from nasfcos.io import safe_torch_load, strip_common_prefixes

LEVELS: tuple[str, ...] = ("c2", "c3", "c4", "c5")
STRIDES: dict[str, int] = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

_RESNET_BASIC = {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
_RESNET_BOTTLENECK = {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}

#: Output channels of every supported backbone, per level. The keys are the valid ``build_backbone`` names.
BACKBONES: dict[str, dict[str, int]] = {
    "resnet18": dict(_RESNET_BASIC),
    "resnet50": dict(_RESNET_BOTTLENECK),
    "resnet101": dict(_RESNET_BOTTLENECK),
    "resnext101_32x4d": dict(_RESNET_BOTTLENECK),
    "resnext101_32x8d": dict(_RESNET_BOTTLENECK),
    "mobilenet_v2": {"c2": 24, "c3": 32, "c4": 96, "c5": 320},
}

#: MobileNetV2 ``features`` slices: the stem (stride 2) then the blocks ending at each tap.
_MOBILENET_STAGES: tuple[tuple[int, int], ...] = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 18))

PRETRAINED_FORMATS: tuple[str, ...] = ("auto", "torchvision", "timm")

# Prefixes that training frameworks put in front of every key (DataParallel, timm/EMA wrappers, detectors).
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "model.", "backbone.", "body.", "encoder.", "base_model.")
# Classification-only tensors: the classifier (torchvision ``fc`` / ``classifier``, timm ``head``) and
# MobileNetV2's final 1x1 conv (torchvision ``features.18``, timm ``conv_head`` + ``bn2``).
_CLASSIFIER_KEY = re.compile(r"^(fc|classifier|head|last_linear|features\.18|conv_head|bn2)\.")


class Backbone(nn.Module, abc.ABC):
    """A feature extractor returning ``{"c2", "c3", "c4", "c5"}`` at strides 4, 8, 16, 32.

    Subclasses keep torchvision's attribute names so that their ``state_dict`` keys are the classification
    model's keys minus the classifier: pretrained files load by name.
    """

    name: str
    out_channels: dict[str, int]
    strides: dict[str, int]

    @abc.abstractmethod
    def stages(self) -> list[nn.Module]:
        """Modules in order: the stem, then one module (or group) per level c2..c5; used for freezing."""

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (``freeze_at >= 1``) and the first ``freeze_at - 1`` stages."""
        stages = self.stages()
        if not 0 <= freeze_at <= len(stages):
            raise UserError(f"freeze_at: must be between 0 and {len(stages)} (got {freeze_at})")
        for stage in stages[:freeze_at]:
            for parameter in stage.parameters():
                parameter.requires_grad_(False)


class ResNetBackbone(Backbone):
    """torchvision ResNet/ResNeXt without ``avgpool`` and ``fc``; ``c2..c5`` are ``layer1..layer4``."""

    def __init__(self, model: ResNet, name: str) -> None:
        super().__init__()
        self.name = name
        self.conv1 = model.conv1
        self.bn1 = model.bn1
        self.relu = model.relu
        self.maxpool = model.maxpool
        self.layer1 = model.layer1
        self.layer2 = model.layer2
        self.layer3 = model.layer3
        self.layer4 = model.layer4
        self.out_channels = dict(BACKBONES[name])
        self.strides = dict(STRIDES)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 ``features[:18]`` with taps after blocks 3, 6, 13 and 17."""

    def __init__(self, features: nn.Sequential, name: str = "mobilenet_v2") -> None:
        super().__init__()
        self.name = name
        self.features = nn.Sequential(*list(features.children())[: _MOBILENET_STAGES[-1][1]])
        self.out_channels = dict(BACKBONES[name])
        self.strides = dict(STRIDES)

    def stages(self) -> list[nn.Module]:
        return [self.features[start:stop] for start, stop in _MOBILENET_STAGES]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        start, stop = _MOBILENET_STAGES[0]
        x = self.features[start:stop](x)
        for level, (start, stop) in zip(LEVELS, _MOBILENET_STAGES[1:]):
            x = self.features[start:stop](x)
            outputs[level] = x
        return outputs


def _resnext101_32x4d() -> ResNet:
    """ResNeXt-101 (32x4d): ResNet-101's layout with 32 groups of width 4 in every bottleneck."""
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)


_BUILDERS: dict[str, Callable[[], Backbone]] = {
    "resnet18": lambda: ResNetBackbone(tv_resnet18(weights=None), "resnet18"),
    "resnet50": lambda: ResNetBackbone(tv_resnet50(weights=None), "resnet50"),
    "resnet101": lambda: ResNetBackbone(tv_resnet101(weights=None), "resnet101"),
    "resnext101_32x4d": lambda: ResNetBackbone(_resnext101_32x4d(), "resnext101_32x4d"),
    "resnext101_32x8d": lambda: ResNetBackbone(tv_resnext101_32x8d(weights=None), "resnext101_32x8d"),
    "mobilenet_v2": lambda: MobileNetV2Backbone(tv_mobilenet_v2(weights=None).features),
}


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    freeze_at: int = 2,
    frozen_bn: bool = True,
    pretrained_format: str = "auto",
) -> Backbone:
    """Build backbone ``name``, load local ``weights`` if given, then freeze as FCOS does.

    Order matters: weights load into ordinary BatchNorm layers, which are then frozen with the loaded
    statistics. ``pretrained_format`` is ``"auto"`` (match by name, else by position), ``"torchvision"``
    (by name only) or ``"timm"`` (same as auto); see :func:`load_backbone_weights`.
    """
    if name not in _BUILDERS:
        raise UserError(f"backbone: unknown name {name!r}; expected one of {', '.join(BACKBONES)}")
    if pretrained_format not in PRETRAINED_FORMATS:
        raise UserError(
            f"pretrained_format: unknown value {pretrained_format!r}; expected one of {', '.join(PRETRAINED_FORMATS)}"
        )
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= len(LEVELS) + 1:
        raise UserError(f"freeze_at: must be an integer between 0 and {len(LEVELS) + 1} (got {freeze_at!r})")
    backbone = _BUILDERS[name]()
    if weights is not None:
        load_backbone_weights(backbone, weights, pretrained_format)
    if frozen_bn:
        convert_frozen_batchnorm(backbone)
    backbone.freeze(freeze_at)
    return backbone


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` below ``module`` (in place) by a ``FrozenBatchNorm2d`` with its values."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None and child.running_var is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, child_name, frozen)
        else:
            convert_frozen_batchnorm(child)
    return module


# ----------------------------------------------------------------------------------------------- weights


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the tensor dict inside a checkpoint: the dict itself, or under ``state_dict``/``model``/..."""
    for _ in range(4):  # checkpoints nest at most a few levels (e.g. {"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(value, Tensor) for value in obj.values()):
            return {str(key): value for key, value in obj.items()}
        for wrapper in ("state_dict", "model", "model_state", "model_state_dict", "module", "net"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
        else:
            # A dict mixing tensors with bookkeeping (epoch, optimizer...): keep the tensors.
            tensors = {str(key): value for key, value in obj.items() if isinstance(value, Tensor)}
            if tensors:
                return tensors
            break
    raise UserError(
        f"{path}: no state dict of tensors found (expected a torchvision/timm state_dict, possibly nested "
        "under 'state_dict' or 'model')"
    )



def _backbone_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop classifier tensors and BN ``num_batches_tracked`` counters (bookkeeping, not weights)."""
    return {
        key: value
        for key, value in state.items()
        if not _CLASSIFIER_KEY.match(key) and not key.endswith("num_batches_tracked")
    }


def _shape(tensor: Tensor | None) -> str:
    return "missing" if tensor is None else str(tuple(tensor.shape))


def _match_by_name(
    target: Mapping[str, Tensor], source: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[tuple[str, str, str]]]:
    """Pair tensors by key; return the loadable dict and ``(key, expected, got)`` for every mismatch."""
    matched: dict[str, Tensor] = {}
    mismatches: list[tuple[str, str, str]] = []
    for key, expected in target.items():
        got = source.get(key)
        if got is None or got.shape != expected.shape:
            mismatches.append((key, _shape(expected), _shape(got)))
        else:
            matched[key] = got
    for key, got in source.items():
        if key not in target:
            mismatches.append((key, "not a backbone tensor", _shape(got)))
    return matched, mismatches


def _match_by_position(target: Mapping[str, Tensor], source: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """Pair tensors in order when every shape agrees (timm renames but keeps torchvision's order/shapes).

    Extra tensors after the last backbone tensor (a classifier-side conv the name filter did not know) are
    ignored; anything else that does not line up means the files describe different networks.
    """
    if len(source) < len(target):
        return None
    pairs = zip(target.items(), source.values())
    if any(expected.shape != got.shape for (_, expected), got in pairs):
        return None
    return {key: got for (key, _), got in zip(target.items(), source.values())}


def load_backbone_weights(backbone: Backbone, weights: str | Path, pretrained_format: str = "auto") -> None:
    """Load a classification checkpoint from a local file into ``backbone`` (BatchNorm not yet frozen).

    Accepted: a torchvision ``state_dict`` of the classification model, or a timm-style checkpoint (the dict
    may be nested under ``state_dict``/``model`` and keys may carry ``module.``-like prefixes). Classifier
    tensors are dropped. Keys are matched by name; in ``auto``/``timm`` mode a file whose names differ but
    whose tensors have the same shapes in the same order (timm's MobileNetV2) is matched by position.
    Anything else is a :class:`UserError` naming the first mismatched key, both shapes and the count.
    """
    path = Path(weights)
    raw = safe_torch_load(path, what="backbone weights")
    source = _backbone_tensors(strip_common_prefixes(_unwrap_state_dict(raw, path), _WRAPPER_PREFIXES))
    target = _backbone_tensors(backbone.state_dict())
    matched, mismatches = _match_by_name(target, source)
    if mismatches and pretrained_format in ("auto", "timm"):
        by_position = _match_by_position(target, source)
        if by_position is not None:
            matched, mismatches = by_position, []
    if mismatches:
        key, expected, got = mismatches[0]
        raise UserError(
            f"{path}: weights do not fit backbone {backbone.name}: {len(mismatches)} tensor(s) mismatched; "
            f"first: {key!r} expects {expected}, file has {got}"
        )
    with torch.no_grad():
        own = backbone.state_dict()
        for key, value in matched.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
