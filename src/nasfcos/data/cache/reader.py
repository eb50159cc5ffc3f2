"""Reading a built feature cache: :class:`FeatureCache` (manifest + checks) and its memory-mapped splits, plus the
batches the search's proxy trains on (:class:`SplitTensors`).

A cache folder is opened only if its manifest parses, has this format version and every array has the shape
and dtype the manifest promises (:meth:`FeatureCache.open`); anything else is a one-line
:class:`~nasfcos.errors.UserError` that says to rebuild. Reads go through ``np.load(mmap_mode="r")`` in
ascending row order (:func:`take_rows`), so a batch of a large cache costs one pass over the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nasfcos.data.cache.format import (
    LEVELS,
    MANIFEST,
    SPLITS,
    check_manifest,
    expected_arrays,
    target_suffix,
)
from nasfcos.detection.points import level_points
from nasfcos.detection.targets import FCOSTargets
from nasfcos.errors import UserError
from nasfcos.io import read_json

__all__ = ["CachedSplit", "FeatureCache", "SplitTensors", "clear_resident", "split_nbytes", "take_rows"]


def _as_index_array(indices: Any, size: int) -> np.ndarray:
    if isinstance(indices, slice):
        return np.arange(size, dtype=np.int64)[indices]
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices, dtype=np.int64).reshape(-1)
    if array.size and (array.min() < -size or array.max() >= size):
        raise IndexError(f"cache index out of range for a split of {size} images")
    return np.where(array < 0, array + size, array)


def take_rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]`` reading the memmap in ascending order (one contiguous slice when possible)."""
    if index.size == 0:
        return np.array(array[:0])
    if index.size > 1 and np.all(np.diff(index) == 1):
        return np.array(array[int(index[0]): int(index[-1]) + 1])  # one contiguous read, copied out of the map
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    rows = np.asarray(array[sorted_index])
    if np.all(order[:-1] < order[1:]):
        return rows
    out = np.empty_like(rows)
    out[order] = rows
    return out


class CachedSplit:
    """One split of a :class:`FeatureCache` (``"train"`` = meta-train, ``"val"`` = meta-val), memory-mapped.

    Indices are positions ``0..len-1`` in the split (any order; results follow the given order; reads go in
    ascending order, a contiguous run as one slice).
    """

    def __init__(self, cache: FeatureCache, name: str) -> None:
        self.cache = cache
        self.name = name
        self.path = cache.path / name
        info = cache.manifest["splits"][name]
        self.size = int(info["size"])
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"CachedSplit({self.name!r}, {self.size} images, {self.path})"

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped array ``name`` (``c3``, ``labels``, ``reg_improved``, ``gt_boxes``...), read-only."""
        if name not in self._arrays:
            self._arrays[name] = _open_array(self.path / f"{name}.npy")
        return self._arrays[name]

    @property
    def nbytes(self) -> int:
        """Bytes of this split's files on disk."""
        return sum(p.stat().st_size for p in self.path.glob("*.npy"))

    @property
    def image_ids(self) -> np.ndarray:
        return np.array(self.array("image_ids"))

    def features(self, indices: Any, *, dtype: torch.dtype | None = torch.float32,
                 device: torch.device | str | None = None, levels: Sequence[str] = LEVELS) -> dict[str, Tensor]:
        """``{"c2".."c5": [n, C, H, W]}`` for ``indices`` (``dtype=None`` keeps the stored dtype)."""
        index = _as_index_array(indices, self.size)
        out = {}
        for level in levels:
            tensor = torch.from_numpy(take_rows(self.array(level), index))
            if device is not None:
                tensor = tensor.to(device, non_blocking=True)
            out[level] = tensor if dtype is None else tensor.to(dtype)
        return out

    def targets(self, indices: Any, mode: str = "vanilla", *, device: torch.device | str | None = None
                ) -> FCOSTargets:
        """The cached FCOS targets of ``indices`` as :class:`FCOSTargets` (``[n, P]`` / ``[n, P, 4]``).

        ``labels`` and ``matched`` come back as int64, ``reg``/``centerness`` float32, and ``boxes`` (the matched
        ground-truth box of each point, zeros for background) are gathered from the cached ground truth.
        """
        index = _as_index_array(indices, self.size)
        suffix = self.cache.target_suffix(mode)
        labels = torch.from_numpy(take_rows(self.array("labels" + suffix), index).astype(np.int64))
        reg = torch.from_numpy(take_rows(self.array("reg" + suffix), index))
        centerness = torch.from_numpy(take_rows(self.array("centerness" + suffix), index))
        matched = torch.from_numpy(take_rows(self.array("matched" + suffix), index).astype(np.int64))
        offsets = np.asarray(self.array("gt_offsets"))
        gt_boxes = torch.from_numpy(np.array(self.array("gt_boxes")))
        rows = torch.from_numpy(offsets[index]).view(-1, 1) + matched.clamp(min=0)
        boxes = gt_boxes[rows.clamp(max=max(len(gt_boxes) - 1, 0))] if len(gt_boxes) else torch.zeros(
            (*matched.shape, 4))
        boxes = torch.where((matched >= 0)[..., None], boxes, torch.zeros(()))
        result = FCOSTargets(labels=labels, boxes=boxes, reg=reg, centerness=centerness, matched=matched)
        return result.to(device) if device is not None else result

    def gt(self, indices: Any) -> list[dict[str, Any]]:
        """Per image ``{"boxes" [M, 4] crop pixels, "labels" [M] int64, "ignore" [M] bool, "image_id"}``."""
        index = _as_index_array(indices, self.size)
        offsets = np.asarray(self.array("gt_offsets"))
        boxes, labels, ignore = self.array("gt_boxes"), self.array("gt_labels"), self.array("gt_ignore")
        ids = self.array("image_ids")
        result = []
        for i in index.tolist():
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            result.append({
                "boxes": torch.from_numpy(np.array(boxes[lo:hi], dtype=np.float32)).reshape(-1, 4),
                "labels": torch.from_numpy(np.array(labels[lo:hi], dtype=np.int64)),
                "ignore": torch.from_numpy(np.array(ignore[lo:hi], dtype=bool)),
                "image_id": int(ids[i]),
            })
        return result

    def coco_gt(self, indices: Any | None = None) -> dict[str, Any]:
        """COCO ground truth of the crops (image id = position in the split; ignored objects as crowd)."""
        index = np.arange(self.size) if indices is None else _as_index_array(indices, self.size)
        crop = int(self.cache.manifest["crop"])
        category_ids = self.cache.category_ids
        images, annotations = [], []
        for position, item in zip(index.tolist(), self.gt(index)):
            images.append({"id": int(position), "width": crop, "height": crop, "file_name": str(item["image_id"])})
            for box, label, ignore in zip(item["boxes"].tolist(), item["labels"].tolist(), item["ignore"].tolist()):
                x1, y1, x2, y2 = box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": int(position), "category_id": int(category_ids[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ignore),
                })
        categories = [{"id": int(c), "name": n} for c, n in zip(category_ids, self.cache.class_names)]
        return {"info": {"description": f"nasfcos feature cache {self.cache.path} [{self.name}]"},
                "images": images, "annotations": annotations, "categories": categories}


def _open_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: cache file missing; the cache is incomplete (rebuild it with `nasfcos cache`)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: unreadable cache file ({str(exc).splitlines()[0]}); rebuild the cache") from None


class FeatureCache:
    """A built cache folder: its manifest and its two splits. Open one with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, reused: bool = False, seconds: float = 0.0) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.reused = reused
        self.seconds = seconds
        self._splits: dict[str, CachedSplit] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str] | FeatureCache) -> FeatureCache:
        """Open and check a cache folder; :class:`UserError` if it is missing, incomplete or corrupt."""
        if isinstance(path, FeatureCache):
            return path
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"{root}: feature cache folder not found (build it with `nasfcos cache`)")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path}: missing; the cache is incomplete or not a cache "
                            "(build it with `nasfcos cache`)")
        manifest = read_json(manifest_path, what="cache manifest")
        check_manifest(manifest, manifest_path)
        cache = cls(root, manifest)
        cache._check_files()
        return cache

    # ---------------------------------------------------------------- manifest views
    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def category_ids(self) -> list[int]:
        return [int(c) for c in self.manifest["category_ids"]]

    @property
    def channels(self) -> dict[str, int]:
        """Backbone output channels per level (the decoder's ``in_channels``)."""
        return {k: int(v) for k, v in self.manifest["channels"].items()}

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {k: tuple(int(x) for x in v) for k, v in self.manifest["feature_shapes"].items()}  # type: ignore[misc]

    @property
    def crop(self) -> int:
        return int(self.manifest["crop"])

    @property
    def fcos_modes(self) -> tuple[str, ...]:
        return tuple(self.manifest["fcos_modes"])

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.manifest["strides"])

    @property
    def level_sizes(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.manifest["level_sizes"]]

    @property
    def fingerprint(self) -> str:
        """sha1 of the manifest key: two caches with the same fingerprint hold the same data."""
        text = json.dumps(self.manifest["key"], sort_keys=True)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    @property
    def cache_nbytes(self) -> int:
        """Bytes of all cache files on disk (both splits and the manifest)."""
        return sum(self.split(name).nbytes for name in SPLITS) + (self.path / MANIFEST).stat().st_size

    def target_suffix(self, mode: str) -> str:
        if mode not in self.fcos_modes:
            raise UserError(f"{self.path}: fcos mode {mode!r} is not cached (cached: {', '.join(self.fcos_modes)}); "
                            "rebuild with fcos='improved' to cache both")
        return target_suffix(mode)

    def points(self, device: torch.device | str | None = None) -> list[Tensor]:
        """The FCOS points of the crop, per level P3..P7 (what the targets were assigned for)."""
        return level_points(self.level_sizes, self.strides, device=device)

    def split(self, name: str) -> CachedSplit:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {name!r})")
        if name not in self._splits:
            self._splits[name] = CachedSplit(self, name)
        return self._splits[name]

    @property
    def train(self) -> CachedSplit:
        return self.split("train")

    @property
    def val(self) -> CachedSplit:
        return self.split("val")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n} {self.manifest['splits'][n]['size']}" for n in SPLITS)
        return f"FeatureCache({self.path}, {self.manifest['backbone']} @ {self.crop}, {sizes})"

    def _check_files(self) -> None:
        """Every array exists with the shape and dtype the manifest promises (catches truncation)."""
        for name in SPLITS:
            split = self.split(name)
            for array_name, (shape, dtype) in expected_arrays(self.manifest, name).items():
                array = split.array(array_name)
                if tuple(array.shape) != tuple(shape) or str(array.dtype) != dtype:
                    raise UserError(f"{split.path / (array_name + '.npy')}: shape {tuple(array.shape)} {array.dtype} "
                                    f"differs from the manifest's {tuple(shape)} {dtype}; rebuild the cache")


# --------------------------------------------------------------------------------------------------------------
# Training batches for the proxy
# --------------------------------------------------------------------------------------------------------------

#: Splits held in memory for consecutive candidates: ``(cache fingerprint, split, mode, device) -> tensors``.
_RESIDENT: dict[tuple[str, str, str, str], dict[str, Tensor]] = {}
_TRAINING_ARRAYS = ("labels", "reg", "centerness")


def split_nbytes(cache: FeatureCache, name: str, mode: str) -> int:
    """Bytes of what :class:`SplitTensors` reads from split ``name`` (features + ``mode`` targets)."""
    split = cache.split(name)
    suffix = cache.target_suffix(mode)
    names = list(LEVELS) + [n + suffix for n in _TRAINING_ARRAYS]
    return sum(int(split.array(n).nbytes) for n in names)


def clear_resident() -> None:
    """Free the splits held in memory by earlier candidates (e.g. before switching caches in one process)."""
    _RESIDENT.clear()


class SplitTensors:
    """Batches ``(features float32, FCOSTargets(labels int64, reg, centerness))`` of one split on ``device``.

    ``resident``: the split's features and targets are copied to ``device`` once and kept for the next
    candidate with the same cache, split, mode and device (a new cache frees the old one's first); else every
    batch is read from the memory map. ``channels_last`` sets the features' memory format. Targets carry no
    ``boxes``/``matched`` (the proxy's losses do not read them).
    """

    def __init__(self, cache: FeatureCache, name: str, mode: str, device: torch.device, resident: bool,
                 channels_last: bool) -> None:
        self.split = cache.split(name)
        self.suffix = cache.target_suffix(mode)
        self.device = device
        self.channels_last = channels_last
        self.size = len(self.split)
        self.tensors: dict[str, Tensor] | None = None
        if resident:
            key = (cache.fingerprint, name, mode, str(device))
            if key not in _RESIDENT:
                for stale in [k for k in _RESIDENT if k[0] != cache.fingerprint]:
                    del _RESIDENT[stale]  # another cache: free its memory first
                arrays = {level: self.split.array(level) for level in LEVELS}
                arrays.update({n: self.split.array(n + self.suffix) for n in _TRAINING_ARRAYS})
                _RESIDENT[key] = {n: torch.from_numpy(np.array(a)).to(device) for n, a in arrays.items()}
            self.tensors = _RESIDENT[key]

    def batch(self, index: np.ndarray) -> tuple[dict[str, Tensor], FCOSTargets]:
        """Features and targets of the (sorted) positions ``index``."""
        if self.tensors is not None:
            rows = torch.from_numpy(index).to(self.device)
            features = {level: self.tensors[level].index_select(0, rows) for level in LEVELS}
            labels, reg, centerness = (self.tensors[n].index_select(0, rows) for n in _TRAINING_ARRAYS)
        else:
            features = {level: torch.from_numpy(take_rows(self.split.array(level), index)).to(self.device)
                        for level in LEVELS}
            labels, reg, centerness = (
                torch.from_numpy(take_rows(self.split.array(n + self.suffix), index)).to(self.device)
                for n in _TRAINING_ARRAYS)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        features = {k: v.to(torch.float32).contiguous(memory_format=memory_format) for k, v in features.items()}
        empty = labels.new_empty(0)
        targets = FCOSTargets(labels=labels.long(), boxes=empty, reg=reg.float(), centerness=centerness.float(),
                              matched=empty)
        return features, targets
