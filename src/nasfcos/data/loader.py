"""PyTorch datasets and loaders over a :class:`DetectionSet`.

``DetectionDataset[i]`` returns ``(image, target)``: the transformed image tensor and a target dict with
``boxes`` (``float32 [M, 4]`` xyxy in the transformed image's pixels), ``labels`` (``int64 [M]``, 0..K-1),
``image_id`` (int), ``orig_size`` / ``size`` (``(h, w)`` ints), ``scale`` (``(sx, sy)``, current pixels per
original pixel, as :func:`nasfcos.detection.postprocess.postprocess` takes them) and ``affine`` (see
:mod:`nasfcos.data.transforms`). Crowd regions and VOC "difficult" objects are left out of training targets by
default (FCOS trains only on ``iscrowd == 0``; VOC practice ignores difficult objects); evaluation uses the
full records through :meth:`DetectionSet.to_coco_dict`.

Randomness: with ``seed`` set, item ``i`` in epoch ``e`` is transformed with a generator seeded from
``(seed, e, i)``, so augmentation does not depend on worker count or loading order (call
:func:`set_epoch` each epoch). Without a seed the transforms use torch's global generator.

Images are decoded with PIL and converted to RGB. A missing or corrupt image, or one whose size differs from
its annotation (which would misplace every box), raises a one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from nasfcos.data.records import DetectionSet, ImageRecord
from nasfcos.data.transforms import ToTensor, init_target, pad_batch
from nasfcos.errors import UserError

Transform = Callable[..., tuple[Any, dict[str, Any]]]


def load_image(record: ImageRecord) -> Image.Image:
    """Decode a record's image as RGB; one-line :class:`UserError` if missing, corrupt or of the wrong size."""
    path = record.path
    if not path.is_file():
        raise UserError(f"{path}: image file not found (image id {record.image_id})")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # convert() fully decodes: truncated data fails here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot decode image: {message}") from None
    if image.size != (record.width, record.height):
        raise UserError(f"{path}: size: {image.width}x{image.height}: differs from the annotated "
                        f"{record.width}x{record.height} (image id {record.image_id})")
    return image


def record_target(record: ImageRecord, *, include_crowd: bool = False, include_difficult: bool = False
                  ) -> dict[str, Any]:
    """The untransformed target of a record (crowd / difficult objects removed unless asked for)."""
    keep = np.ones(record.num_objects, dtype=bool)
    if not include_crowd:
        keep &= ~record.iscrowd
    if not include_difficult:
        keep &= ~record.difficult
    return {
        "boxes": torch.from_numpy(record.boxes[keep].copy()).reshape(-1, 4),
        "labels": torch.from_numpy(record.labels[keep].copy()),
        "iscrowd": torch.from_numpy(record.iscrowd[keep].copy()),
        "difficult": torch.from_numpy(record.difficult[keep].copy()),
        "image_id": record.image_id,
        "orig_size": (record.height, record.width),
    }


_ORDER_STREAM = 2**31 - 1  # the "index" used to seed an epoch's shuffle order, distinct from every item


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


class DetectionDataset(Dataset):
    """Map-style dataset of ``(image tensor, target)`` over a :class:`DetectionSet` (see module doc)."""

    def __init__(self, dataset: DetectionSet, transforms: Transform | None = None, *, seed: int | None = None,
                 include_crowd: bool = False, include_difficult: bool = False) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        self.include_crowd = include_crowd
        self.include_difficult = include_difficult

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        record = self.dataset.records[index]
        image: Any = load_image(record)
        target = init_target(image, record_target(record, include_crowd=self.include_crowd,
                                                  include_difficult=self.include_difficult))
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        if self.transforms is not None:
            image, target = self.transforms(image, target, generator)
        if not isinstance(image, Tensor):
            image, target = ToTensor()(image, target)
        return image, target


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]], size_divisible: int = 32
            ) -> tuple[Tensor, list[dict[str, Any]]]:
    """``(padded [N, 3, H, W] batch, list of targets)``; each target keeps its own ``size`` (before padding)."""
    images, targets = zip(*batch)
    padded, sizes = pad_batch(list(images), size_divisible)
    out = []
    for target, size in zip(targets, sizes):
        target = dict(target)
        target["size"] = size
        out.append(target)
    return padded, out


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                 distributed: bool | None = False, *, drop_last: bool = False, size_divisible: int = 32,
                 pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` with :func:`collate` and a seeded order.

    ``distributed=True`` shards the data across ranks with a ``DistributedSampler`` (torch.distributed must be
    initialised, e.g. under torchrun); ``None`` does so whenever it is initialised. ``batch_size`` is per rank.
    Call :func:`set_epoch` before each epoch so that the order (and seeded augmentation) changes per epoch.
    """
    if batch_size <= 0:
        raise UserError(f"batch_size: {batch_size}: expected a positive integer")
    use_dist = _dist_ready() if distributed is None else bool(distributed)
    if use_dist and not _dist_ready():
        raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised")
    generator = torch.Generator().manual_seed(int(seed))
    if use_dist:
        sampler: Any = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed), drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=functools.partial(collate, size_divisible=size_divisible), drop_last=drop_last,
                        pin_memory=pin_memory, generator=generator, persistent_workers=False)
    loader._nasfcos_seed = int(seed)  # type: ignore[attr-defined]
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the sampler (distributed shuffling) and the dataset (seeded augmentation) which epoch starts.

    For the non-distributed shuffle the seeded ``RandomSampler`` already advances its own generator every
    epoch; re-seeding it here makes epoch ``e``'s order depend on ``(seed, e)`` only, so a resumed run sees the
    same order as an uninterrupted one.
    """
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        base = getattr(loader, "_nasfcos_seed", None)
        if base is None:
            base = int(sampler.generator.initial_seed())
            loader._nasfcos_seed = base  # type: ignore[attr-defined]
        sampler.generator.manual_seed(_item_seed(base, epoch, _ORDER_STREAM))
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
