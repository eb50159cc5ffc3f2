"""Image + box transforms for detection: every geometric change to the image moves the boxes exactly with it.

A transform is called as ``t(image, target, generator=None) -> (image, target)``. ``image`` is a PIL image or
a ``[3, H, W]`` tensor (uint8 or float); ``target`` is a dict with at least ``boxes`` (``float32 [M, 4]``
``xyxy`` pixels of the current image) and ``labels`` (``int64 [M]``); other per-object tensors of length ``M``
(``iscrowd``, ``difficult``, ``areas``) are filtered along with the boxes. Random transforms draw from the
``torch.Generator`` they are given (or torch's global generator), so a seeded generator gives the same result.

Bookkeeping kept in the target, for mapping predictions back to the original image:

- ``orig_size`` ``(h, w)`` of the original image and ``size`` ``(h, w)`` of the current one;
- ``scale`` ``(sx, sy)``: current pixels per original pixel along x and y (the ``scale_factors`` that
  :func:`nasfcos.detection.postprocess.postprocess` divides by);
- ``affine`` ``(ax, bx, ay, by)``: the full map ``x_cur = ax * x_orig + bx``, ``y_cur = ay * y_orig + by``
  (crops add offsets, flips negate ``ax``); :func:`boxes_to_original` inverts it.

Normalisation must match the backbone's weights: torchvision's ImageNet weights expect RGB in ``[0, 1]``
normalised by :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (the default). Caffe-style weights (the original
maskrcnn-benchmark R-50) expect BGR in ``[0, 255]`` minus :data:`CAFFE_MEAN` with std 1: ``Normalize.caffe()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Generator, Tensor

from nasfcos.space.ops import IMAGENET_MEAN, IMAGENET_STD

CAFFE_MEAN = (102.9801, 115.9465, 122.7717)  # BGR order, 0..255 pixels

Target = dict[str, Any]
ImageLike = Image.Image | Tensor

#: Per-object entries of a target that are filtered together with the boxes.
PER_OBJECT_KEYS = ("boxes", "labels", "iscrowd", "difficult", "areas")


def image_size(image: ImageLike) -> tuple[int, int]:
    """``(h, w)`` of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def init_target(image: ImageLike, target: Target | None = None) -> Target:
    """Fill the bookkeeping entries (``orig_size``, ``size``, ``scale``, ``affine``) for an untransformed image."""
    target = dict(target or {})
    h, w = image_size(image)
    target.setdefault("boxes", torch.zeros((0, 4), dtype=torch.float32))
    target.setdefault("labels", torch.zeros((0,), dtype=torch.int64))
    target["boxes"] = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
    target.setdefault("orig_size", (h, w))
    target.setdefault("size", (h, w))
    target.setdefault("scale", (1.0, 1.0))
    target.setdefault("affine", (1.0, 0.0, 1.0, 0.0))
    return target


def _compose_affine(target: Target, ax: float, bx: float, ay: float, by: float) -> None:
    """Apply ``x -> ax * x + bx`` (and y) after the target's current map."""
    a0, b0, c0, d0 = target["affine"]
    target["affine"] = (ax * a0, ax * b0 + bx, ay * c0, ay * d0 + by)
    target["scale"] = (abs(target["affine"][0]), abs(target["affine"][2]))


def filter_objects(target: Target, keep: Tensor) -> Target:
    """Keep the objects selected by ``keep`` in every per-object entry."""
    for key in PER_OBJECT_KEYS:
        if key in target and isinstance(target[key], Tensor) and target[key].shape[:1] == keep.shape[:1]:
            target[key] = target[key][keep]
    return target


def boxes_to_original(boxes: Tensor, target: Target, clip: bool = True) -> Tensor:
    """Map ``xyxy`` boxes in the current image's pixels back to the original image (inverse of ``affine``)."""
    ax, bx, ay, by = target.get("affine", (1.0, 0.0, 1.0, 0.0))
    out = boxes.clone().to(torch.float32)
    out[:, 0::2] = (boxes[:, 0::2] - bx) / ax
    out[:, 1::2] = (boxes[:, 1::2] - by) / ay
    if ax < 0:
        out[:, [0, 2]] = out[:, [2, 0]]
    if ay < 0:
        out[:, [1, 3]] = out[:, [3, 1]]
    if clip and "orig_size" in target:
        h, w = target["orig_size"]
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high]``."""
    return int(torch.randint(0, high + 1, (), generator=generator))


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        for transform in self.transforms:
            image, target = transform(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def resize_to(image: ImageLike, target: Target, new_h: int, new_w: int) -> tuple[ImageLike, Target]:
    """Resize to exactly ``(new_h, new_w)``; boxes scale by ``new_w / w`` and ``new_h / h`` (exact per axis)."""
    target = init_target(image, target)
    h, w = image_size(image)
    if (new_h, new_w) != (h, w):
        if isinstance(image, Image.Image):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        else:
            image = TF.resize(image, [new_h, new_w], antialias=True)
    sx, sy = new_w / w, new_h / h
    target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    target["size"] = (new_h, new_w)
    _compose_affine(target, sx, 0.0, sy, 0.0)
    return image, target


def short_side_size(h: int, w: int, short: int, max_size: int | None) -> tuple[int, int]:
    """FCOS sizing: scale so the short side is ``short`` unless the long side would exceed ``max_size``."""
    scale = short / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class ResizeShortSide:
    """Resize so the short side is ``short`` (one drawn at random from a tuple: multi-scale training) and the
    long side at most ``max_size`` (FCOS: 800 / 1333; ``None`` for no cap)."""

    def __init__(self, short: int | Sequence[int] = 800, max_size: int | None = 1333) -> None:
        self.shorts = (int(short),) if isinstance(short, int) else tuple(int(s) for s in short)
        if not self.shorts or min(self.shorts) <= 0:
            raise ValueError(f"ResizeShortSide: bad short side {short}")
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        short = self.shorts[0] if len(self.shorts) == 1 else self.shorts[_randint(len(self.shorts) - 1, generator)]
        h, w = image_size(image)
        return resize_to(image, target, *short_side_size(h, w, short, self.max_size))

    def __repr__(self) -> str:
        return f"ResizeShortSide({self.shorts}, max_size={self.max_size})"


def crop(image: ImageLike, target: Target, top: int, left: int, height: int, width: int,
         min_visible: float = 0.25, min_size: float = 1.0) -> tuple[ImageLike, Target]:
    """Crop ``[top, top+height) x [left, left+width)``; boxes are shifted and clipped to the crop, and dropped
    when less than ``min_visible`` of their area or less than ``min_size`` pixels of width/height remain."""
    target = init_target(image, target)
    if isinstance(image, Image.Image):
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image[..., top:top + height, left:left + width]
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    area_before = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (bw >= min_size) & (bh >= min_size) & (bw * bh >= min_visible * area_before)
    target["boxes"] = boxes
    filter_objects(target, keep)
    target["size"] = (height, width)
    _compose_affine(target, 1.0, -float(left), 1.0, -float(top))
    return image, target


class RandomSquareCrop:
    """The paper's proxy-task input: optionally resize the short side to ``size``, then cut a random
    ``size x size`` square (a side shorter than ``size`` is kept whole; ``pad_batch`` pads it).

    Boxes are clipped to the square; a box keeping less than ``min_visible`` (default 25 %) of its area, or
    less than 1 px of width or height, is dropped — its visible sliver would teach the head to fire on
    fragments. ``resize=True`` makes this transform alone the "short side 384, random 384x384 crop" of the
    paper; with ``resize=False`` put a :class:`ResizeShortSide` before it.
    """

    def __init__(self, size: int = 384, *, resize: bool = True, min_visible: float = 0.25) -> None:
        self.size = int(size)
        self.resize = resize
        self.min_visible = float(min_visible)

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        if self.resize:
            h, w = image_size(image)
            image, target = resize_to(image, target, *short_side_size(h, w, self.size, None))
        h, w = image_size(image)
        ch, cw = min(h, self.size), min(w, self.size)
        top = _randint(h - ch, generator)
        left = _randint(w - cw, generator)
        return crop(image, target, top, left, ch, cw, self.min_visible)

    def __repr__(self) -> str:
        return f"RandomSquareCrop({self.size}, resize={self.resize}, min_visible={self.min_visible})"


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror left-right: ``x1' = W - x2``, ``x2' = W - x1``."""
    target = init_target(image, target)
    h, w = image_size(image)
    image = image.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(image, Image.Image) else image.flip(-1)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    target["boxes"] = boxes
    target["flipped"] = not target.get("flipped", False)
    _compose_affine(target, -1.0, float(w), 1.0, 0.0)
    return image, target


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        if self.p > 0 and _uniform(generator) < self.p:
            return hflip(image, target)
        return image, init_target(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToTensor:
    """PIL image or uint8 tensor -> ``float32 [3, H, W]`` in ``[0, 1]`` (``dtype=torch.uint8`` keeps bytes,
    e.g. for the feature cache)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        target = init_target(image, target)
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if self.dtype == torch.uint8:
            if image.dtype != torch.uint8:
                image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        elif image.dtype == torch.uint8:
            image = image.to(self.dtype) / 255.0
        else:
            image = image.to(self.dtype)
        return image, target

    def __repr__(self) -> str:
        return f"ToTensor({self.dtype})"


class Normalize:
    """``(x * pixel_range [-> BGR] - mean) / std`` on a float ``[3, H, W]`` tensor in ``[0, 1]``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, *,
                 to_bgr: bool = False, pixel_range: float = 1.0) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.to_bgr = to_bgr
        self.pixel_range = float(pixel_range)

    @classmethod
    def caffe(cls) -> Normalize:
        """Caffe-style: BGR, 0..255, minus :data:`CAFFE_MEAN`, std 1 (maskrcnn-benchmark's R-50 weights)."""
        return cls(CAFFE_MEAN, (1.0, 1.0, 1.0), to_bgr=True, pixel_range=255.0)

    def __call__(self, image: ImageLike, target: Target, generator: Generator | None = None) -> tuple[Any, Target]:
        if not isinstance(image, Tensor) or not image.is_floating_point():
            image, target = ToTensor()(image, target)
        x = image * self.pixel_range if self.pixel_range != 1.0 else image
        if self.to_bgr:
            x = x.flip(0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, to_bgr={self.to_bgr}, pixel_range={self.pixel_range})"


def pad_batch(images: Sequence[Tensor], size_divisible: int = 32, pad_value: float = 0.0
              ) -> tuple[Tensor, list[tuple[int, int]]]:
    """Stack ``[C, H, W]`` images into ``[N, C, H', W']``, padding bottom/right up to the batch maximum rounded
    up to a multiple of ``size_divisible`` (so every pyramid level divides evenly). Returns the batch and each
    image's ``(h, w)`` before padding. After :class:`Normalize`, a zero pad is the mean colour."""
    if not images:
        raise ValueError("pad_batch: no images")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    channels = images[0].shape[0]
    div = max(1, int(size_divisible))
    max_h = -(-max(h for h, _ in sizes) // div) * div
    max_w = -(-max(w for _, w in sizes) // div) * div
    batch = images[0].new_full((len(images), channels, max_h, max_w), pad_value)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch, sizes


def build_transforms(train: bool, *, short: int | Sequence[int] = 800, max_size: int | None = 1333,
                     flip: bool = True, normalize: Normalize | None = None) -> Compose:
    """The standard FCOS pipelines: train = resize (multi-scale if a tuple) + flip + tensor + normalise;
    eval = resize + tensor + normalise."""
    steps: list[Any] = [ResizeShortSide(short if train else (short if isinstance(short, int) else max(short)),
                                        max_size)]
    if train and flip:
        steps.append(RandomHorizontalFlip(0.5))
    steps += [ToTensor(), normalize or Normalize()]
    return Compose(steps)


def proxy_transforms(size: int = 384, *, flip: bool = False, normalize: Normalize | None = None) -> Compose:
    """The paper's proxy-task input: short side ``size`` then a random ``size x size`` crop."""
    steps: list[Any] = [RandomSquareCrop(size, resize=True)]
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    steps += [ToTensor(), normalize or Normalize()]
    return Compose(steps)
