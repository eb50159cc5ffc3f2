"""The search's feature cache: frozen-backbone features C2..C5, FCOS targets and ground truth of fixed crops.

Why (paper Sec. 3.3, 4.1; FACTS 5): the proxy task trains thousands of candidate decoders on the same images
with a *frozen* backbone, so the backbone runs once per image here and never again during the search. Every
image of the (training) split is

1. assigned to meta-train or meta-val by :meth:`DetectionSet.split` (deterministic in ``seed``; the paper draws
   4000 / 1715 of VOC's 5715 training images: the default ``meta_train=0.7`` gives exactly that on VOC);
2. resized to short side ``crop`` and randomly cropped to ``crop x crop`` (:class:`RandomSquareCrop`: boxes
   are scaled, clipped, and dropped when less than 25 % of their area stays visible). The crop of an image is
   drawn from a generator seeded by ``(seed, image_id)`` alone (:func:`crop_seed`), so it does not depend on
   the batch size, the split or the order of the records;
3. normalised with ImageNet mean/std (what :class:`~nasfcos.detection.detector.FCOSDetector` uses) and run
   through the frozen backbone (eval mode, frozen BN, no grad) in batches.

What is stored, per split (``train/`` = meta-train, ``val/`` = meta-val), as ``.npy`` files read back
memory-mapped (``np.load(mmap_mode="r")``):

- ``c2.npy .. c5.npy``: ``[N, C, H, W]`` features, float16 by default (``dtype="float32"`` to keep full
  precision; a float16 overflow is reported, never silently stored as ``inf``);
- ``labels.npy`` int16 ``[N, P]`` (``-1`` background), ``reg.npy`` float32 ``[N, P, 4]`` (pixels),
  ``centerness.npy`` float32 ``[N, P]``, ``matched.npy`` int32 ``[N, P]`` (index of the matched object in the
  image's ground-truth list, ``-1`` background): FCOS targets of the crop for the ``P`` points of P3..P7
  (strides 8..128, :data:`~nasfcos.detection.targets.DEFAULT_RANGES`), assigned once here with
  :func:`~nasfcos.detection.targets.assign_targets_batch` (vanilla: FCOS v1, no centre sampling). With
  ``fcos="improved"`` the same four arrays are also stored with the suffix ``_improved`` (centre sampling
  radius 1.5; distances stay in pixels, as the improved head outputs pixels);
- ground truth of every crop for the AP reward: ``gt_boxes.npy`` float32 ``[M, 4]`` xyxy crop pixels,
  ``gt_labels.npy`` int64 ``[M]``, ``gt_ignore.npy`` bool ``[M]`` (crowd / VOC difficult objects: not trained
  on, ignored by the evaluation), ``gt_offsets.npy`` int64 ``[N + 1]`` (image ``i`` owns rows
  ``offsets[i]:offsets[i+1]``), ``image_ids.npy`` int64 ``[N]``, ``affine.npy`` float32 ``[N, 4]``
  (``x_crop = a x + b``, ``y_crop = c y + d`` from original pixels) and ``orig_size.npy`` int32 ``[N, 2]``.

``manifest.json`` is written **last**, atomically: a folder is a valid cache only if its manifest exists,
parses and matches the files. The manifest's ``key`` holds every input that decides the contents (format
version, backbone, weights hash, crop, seed, split sizes, a fingerprint of the records, dtype, FCOS modes,
normalisation). :func:`build_cache` with the same key returns the existing cache at once (``reused=True``);
a different key rebuilds (or raises :class:`UserError` with ``overwrite=False``). Building happens in a
temporary sub-folder that is renamed into place at the end (old manifest removed first), so a crash leaves
either the old valid cache, or no manifest — never a manifest over half-written arrays.

Size: a ResNet-50 cache at the paper's 384 crop is ~8.8 MB per image in float16 (C2 alone is 4.7 MB), about
50 GB for VOC's 5715 images; ResNet-18 at 128 px is 0.25 MB per image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nasfcos.data.loader import load_image, record_target
from nasfcos.data.records import DetectionSet, ImageRecord
from nasfcos.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomSquareCrop, ToTensor
from nasfcos.detection.points import DEFAULT_STRIDES, level_points
from nasfcos.detection.targets import DEFAULT_RANGES, FCOSTargets, assign_targets_batch
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, read_json, safe_torch_load

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "FCOS_RULES",
    "LEVELS",
    "SPLITS",
    "CachedSplit",
    "FeatureCache",
    "build_cache",
    "crop_record",
    "crop_seed",
    "level_sizes",
    "records_fingerprint",
    "take_rows",
]

CACHE_FORMAT = "nasfcos-feature-cache"
CACHE_VERSION = 1
LEVELS: tuple[str, ...] = ("c2", "c3", "c4", "c5")
SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")

#: Target-assignment options of each FCOS flavour (FACTS 4). Distances stay in pixels in both: the decoder's
#: head outputs pixels in both modes (see :mod:`nasfcos.nn.heads`).
FCOS_RULES: dict[str, dict[str, Any]] = {
    "vanilla": {"center_sampling_radius": None, "normalize_by_stride": False},
    "improved": {"center_sampling_radius": 1.5, "normalize_by_stride": False},
}

# --------------------------------------------------------------------------------------------------------------
# Deterministic crops, geometry, identities
# --------------------------------------------------------------------------------------------------------------


def crop_seed(seed: int, image_id: int) -> int:
    """Seed of image ``image_id``'s random crop: a function of ``(seed, image_id)`` only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, 0xCAC4E, int(image_id) & 0xFFFF_FFFF_FFFF_FFFF])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def crop_record(record: ImageRecord, crop: int, seed: int) -> tuple[Tensor, dict[str, Any]]:
    """The cached input of one image: ``(normalised float32 [3, crop, crop] image, target)``.

    Short side ``crop``, then a ``crop x crop`` window drawn with :func:`crop_seed`; ImageNet normalisation.
    The target holds every object (crowd and difficult included, flagged in ``ignore``) in crop pixels, plus
    ``affine`` (original -> crop pixels) and ``orig_size``.
    """
    image: Any = load_image(record)
    target = record_target(record, include_crowd=True, include_difficult=True)
    generator = torch.Generator().manual_seed(crop_seed(seed, record.image_id))
    image, target = RandomSquareCrop(crop, resize=True)(image, target, generator)
    image, target = ToTensor()(image, target)
    image, target = Normalize(IMAGENET_MEAN, IMAGENET_STD)(image, target)
    target["ignore"] = target["iscrowd"].bool() | target["difficult"].bool()
    return image, target


def level_sizes(feature_shapes: Mapping[str, Sequence[int]], num_levels: int = 5) -> list[tuple[int, int]]:
    """``(H, W)`` of P3..P7 for backbone features of the given shapes (``{"c3": [C, H, W], ...}``).

    P3..P5 have the C3..C5 sizes; P6 and P7 are stride-2 3x3 convs with padding 1: ``ceil(n / 2)``.
    """
    sizes = [(int(feature_shapes[k][-2]), int(feature_shapes[k][-1])) for k in ("c3", "c4", "c5")]
    while len(sizes) < num_levels:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def records_fingerprint(dataset: DetectionSet) -> str:
    """sha256 of what the cache depends on in the records: order, ids, sizes, file names, objects, classes."""
    digest = hashlib.sha256()
    digest.update(json.dumps([dataset.class_names, dataset.category_ids]).encode("utf-8"))
    for record in dataset.records:
        digest.update(f"|{record.image_id}|{record.width}x{record.height}|{record.file_name}|".encode("utf-8"))
        for array in (record.boxes, record.labels, record.iscrowd, record.difficult):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_sha256(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _detector_backbone_state(path: Path, backbone: str) -> dict[str, Tensor]:
    """The ``backbone.*`` tensors of a ``nasfcos train`` weights file (``model_final.pt`` or a checkpoint)."""
    blob = safe_torch_load(path, "detector weights")
    state = blob.get("model") if isinstance(blob, Mapping) and isinstance(blob.get("model"), Mapping) else blob
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: not a detector weights file (expected a state dict or a 'model' entry)")
    meta = blob.get("meta") if isinstance(blob, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("backbone") not in (None, backbone):
        raise UserError(f"{path}: the detector was trained with backbone {meta.get('backbone')!r}; "
                        f"expected {backbone!r} (--backbone)")
    found = {}
    for name, value in state.items():
        name = str(name)
        if name.startswith("module."):
            name = name[len("module."):]
        if name.startswith("backbone.") and isinstance(value, Tensor):
            found[name[len("backbone."):]] = value
    if not found:
        raise UserError(f"{path}: no 'backbone.*' weights in the file; expected a detector written by nasfcos train")
    return found


def _load_state_into_backbone(name: str, state: Mapping[str, Tensor], source: str) -> torch.nn.Module:
    """A frozen backbone ``name`` holding ``state`` (BN or frozen-BN layout, ``num_batches_tracked`` ignored)."""
    from nasfcos.nn.backbones import build_backbone, convert_frozen_batchnorm

    backbone = build_backbone(name, None, freeze_at=0, frozen_bn=False)
    clean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = {k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(own - set(clean))
    unexpected = sorted(set(clean) - own)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(f"{source}: backbone weights do not match {name} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected; first: {first})")
    try:
        backbone.load_state_dict(clean, strict=False)
    except RuntimeError as exc:
        raise UserError(f"{source}: backbone weights do not fit {name}: {str(exc).splitlines()[0]}") from None
    convert_frozen_batchnorm(backbone)
    return backbone


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


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
        _check_manifest(manifest, manifest_path)
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
        return "" if mode == "vanilla" else f"_{mode}"

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
            for array_name, (shape, dtype) in _expected_arrays(self.manifest, name).items():
                array = split.array(array_name)
                if tuple(array.shape) != tuple(shape) or str(array.dtype) != dtype:
                    raise UserError(f"{split.path / (array_name + '.npy')}: shape {tuple(array.shape)} {array.dtype} "
                                    f"differs from the manifest's {tuple(shape)} {dtype}; rebuild the cache")


_REQUIRED_KEYS = ("format", "version", "key", "backbone", "crop", "seed", "num_classes", "class_names",
                  "category_ids", "channels", "feature_shapes", "dtype", "fcos_modes", "strides", "level_sizes",
                  "num_points", "splits")


def _check_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise UserError(f"{where}: not a nasfcos feature cache manifest (format should be {CACHE_FORMAT!r})")
    if manifest.get("version") != CACHE_VERSION:
        raise UserError(f"{where}: cache format version {manifest.get('version')!r}; this nasfcos reads version "
                        f"{CACHE_VERSION} (rebuild the cache)")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{where}: corrupt manifest: missing {', '.join(missing)}; rebuild the cache")
    splits = manifest["splits"]
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) or "size" not in splits[s]
                                           or "num_objects" not in splits[s] for s in SPLITS):
        raise UserError(f"{where}: corrupt manifest: 'splits' must describe {', '.join(SPLITS)}; rebuild the cache")


def _expected_arrays(manifest: Mapping[str, Any], split: str) -> dict[str, tuple[tuple[int, ...], str]]:
    n = int(manifest["splits"][split]["size"])
    m = int(manifest["splits"][split]["num_objects"])
    p = int(manifest["num_points"])
    arrays: dict[str, tuple[tuple[int, ...], str]] = {
        level: ((n, *(int(x) for x in manifest["feature_shapes"][level])), manifest["dtype"]) for level in LEVELS
    }
    for mode in manifest["fcos_modes"]:
        suffix = "" if mode == "vanilla" else f"_{mode}"
        arrays.update({
            "labels" + suffix: ((n, p), "int16"),
            "reg" + suffix: ((n, p, 4), "float32"),
            "centerness" + suffix: ((n, p), "float32"),
            "matched" + suffix: ((n, p), "int32"),
        })
    arrays.update({
        "gt_boxes": ((m, 4), "float32"), "gt_labels": ((m,), "int64"), "gt_ignore": ((m,), "bool"),
        "gt_offsets": ((n + 1,), "int64"), "image_ids": ((n,), "int64"), "affine": ((n, 4), "float32"),
        "orig_size": ((n, 2), "int32"),
    })
    return arrays


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def _resolve_count(value: int | float | None, total: int, name: str, rest: int | None = None) -> int:
    """A count from an int or a fraction of ``total``; ``None`` means ``rest``."""
    if value is None:
        if rest is None:
            raise UserError(f"{name}: required")
        return rest
    if isinstance(value, bool):
        raise UserError(f"{name}: expected a count or a fraction (got {value!r})")
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise UserError(f"{name}: a fraction must lie in (0, 1) (got {value}); give a count as an integer")
        return int(round(value * total))
    if isinstance(value, int):
        return value
    raise UserError(f"{name}: expected a count or a fraction (got {value!r})")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device: unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {device!r} asked for but CUDA is not available")
    return resolved


def _weights_identity(backbone: str, weights: str | os.PathLike[str] | None,
                      backbone_state: Mapping[str, Tensor] | None,
                      detector_weights: str | os.PathLike[str] | None) -> tuple[dict[str, Any], Any]:
    """``(identity for the manifest key, loader)``: what initialises the backbone, and how to build it."""
    given = [n for n, v in (("weights", weights), ("backbone_state", backbone_state),
                            ("detector_weights", detector_weights)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give at most one source of backbone weights")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"{path}: backbone weights file not found")
        return {"kind": "file", "sha256": _file_sha256(path), "path": str(path)}, ("file", path)
    if detector_weights is not None:
        path = Path(detector_weights)
        if not path.is_file():
            raise UserError(f"{path}: detector weights file not found")
        state = _detector_backbone_state(path, backbone)
        return {"kind": "detector", "sha256": _state_sha256(state), "path": str(path)}, ("state", state, str(path))
    if backbone_state is not None:
        state = dict(backbone_state)
        return {"kind": "state", "sha256": _state_sha256(state)}, ("state", state, "backbone_state")
    return {"kind": "random-init", "sha256": None}, ("random",)


def _make_backbone(name: str, loader: tuple, seed: int) -> torch.nn.Module:
    from nasfcos.nn.backbones import build_backbone

    if loader[0] == "file":
        backbone = build_backbone(name, loader[1], freeze_at=5, frozen_bn=True)
    elif loader[0] == "state":
        backbone = _load_state_into_backbone(name, loader[1], loader[2])
    else:
        # Random init must be reproducible: the same seed gives the same backbone (and so the same cache).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            backbone = build_backbone(name, None, freeze_at=5, frozen_bn=True)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone.eval()


def _cache_key(*, backbone: str, weights_id: Mapping[str, Any], crop: int, seed: int, sizes: tuple[int, int],
               fingerprint: str, dtype: str, fcos_modes: Sequence[str]) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION, "backbone": backbone, "weights_sha256": weights_id.get("sha256"),
        "weights_kind": weights_id["kind"], "crop": int(crop), "seed": int(seed),
        "meta_train": int(sizes[0]), "meta_val": int(sizes[1]), "records": fingerprint, "dtype": dtype,
        "fcos_modes": list(fcos_modes), "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "strides": list(DEFAULT_STRIDES), "ranges": [[float(lo), float(hi)] for lo, hi in DEFAULT_RANGES],
        "crop_min_visible": 0.25,
    }


def _existing_key(root: Path) -> dict[str, Any] | None:
    """The key of a valid cache in ``root``, or ``None`` (missing, corrupt or incomplete)."""
    try:
        return FeatureCache.open(root).manifest["key"]
    except UserError:
        return None


class _Prefetcher:
    """Decodes and crops the next batch of images on worker threads while the backbone runs on this one."""

    def __init__(self, records: Sequence[ImageRecord], crop: int, seed: int, batch_size: int, workers: int) -> None:
        self.records = records
        self.crop = crop
        self.seed = seed
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def _submit(self, start: int) -> list[Future]:
        batch = self.records[start:start + self.batch_size]
        return [self.pool.submit(crop_record, record, self.crop, self.seed) for record in batch]

    def __iter__(self) -> Iterator[tuple[int, list[tuple[Tensor, dict[str, Any]]]]]:
        try:
            pending = self._submit(0) if self.records else []
            start = 0
            while pending:
                next_start = start + self.batch_size
                upcoming = self._submit(next_start) if next_start < len(self.records) else []
                yield start, [future.result() for future in pending]
                pending, start = upcoming, next_start
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _write_split(records: Sequence[ImageRecord], folder: Path, backbone: torch.nn.Module, *, crop: int, seed: int,
                 batch_size: int, device: torch.device, dtype: str, fcos_modes: Sequence[str],
                 shapes: Mapping[str, Sequence[int]], points: list[Tensor], workers: int, progress: bool,
                 desc: str) -> dict[str, Any]:
    """Run the backbone over one split's crops and write its arrays into ``folder``; returns split stats."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    n = len(records)
    num_points = sum(int(p.shape[0]) for p in points)
    np_dtype = np.dtype(dtype)
    features = {level: np.lib.format.open_memmap(folder / f"{level}.npy", mode="w+", dtype=np_dtype,
                                                 shape=(n, *(int(x) for x in shapes[level]))) for level in LEVELS}
    targets: dict[str, dict[str, np.ndarray]] = {}
    for mode in fcos_modes:
        suffix = "" if mode == "vanilla" else f"_{mode}"
        targets[mode] = {
            "labels": np.lib.format.open_memmap(folder / f"labels{suffix}.npy", "w+", np.int16, (n, num_points)),
            "reg": np.lib.format.open_memmap(folder / f"reg{suffix}.npy", "w+", np.float32, (n, num_points, 4)),
            "centerness": np.lib.format.open_memmap(folder / f"centerness{suffix}.npy", "w+", np.float32,
                                                    (n, num_points)),
            "matched": np.lib.format.open_memmap(folder / f"matched{suffix}.npy", "w+", np.int32, (n, num_points)),
        }
    gt_boxes: list[np.ndarray] = []
    gt_labels: list[np.ndarray] = []
    gt_ignore: list[np.ndarray] = []
    offsets = np.zeros(n + 1, dtype=np.int64)
    image_ids = np.zeros(n, dtype=np.int64)
    affine = np.zeros((n, 4), dtype=np.float32)
    orig_size = np.zeros((n, 2), dtype=np.int32)

    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start, batch in _Prefetcher(records, crop, seed, batch_size, workers):
            images = torch.stack([image for image, _ in batch])
            if tuple(images.shape[-2:]) != (crop, crop):
                raise RuntimeError(f"crop produced {tuple(images.shape[-2:])}, expected {crop}x{crop}")
            with torch.inference_mode():
                outputs = backbone(images.to(device, non_blocking=True))
            stop = start + len(batch)
            for level in LEVELS:
                values = outputs[level].to(torch.float16 if dtype == "float16" else torch.float32)
                if not bool(torch.isfinite(values).all()):
                    raise UserError(f"backbone feature {level} overflows {dtype} (values beyond "
                                    f"{float(outputs[level].abs().max()):.3g}); use dtype float32 or other weights")
                features[level][start:stop] = values.cpu().numpy()
            train_targets = []
            for i, (_, target) in enumerate(batch):
                keep = ~target["ignore"]
                train_targets.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep],
                                      "keep": torch.nonzero(keep).reshape(-1)})
                index = start + i
                m = len(target["boxes"])
                offsets[index + 1] = offsets[index] + m
                gt_boxes.append(target["boxes"].numpy().astype(np.float32).reshape(-1, 4))
                gt_labels.append(target["labels"].numpy().astype(np.int64))
                gt_ignore.append(target["ignore"].numpy().astype(bool))
                image_ids[index] = int(records[index].image_id)
                affine[index] = np.asarray(target["affine"], dtype=np.float32)
                orig_size[index] = target["orig_size"]
            for mode in fcos_modes:
                assigned = assign_targets_batch(points, train_targets, DEFAULT_STRIDES, ranges=DEFAULT_RANGES,
                                                **FCOS_RULES[mode])
                # ``matched`` indexes the trained (non-ignored) objects; store it as an index into the full list.
                matched = assigned.matched.clone()
                for i, item in enumerate(train_targets):
                    positive = matched[i] >= 0
                    matched[i, positive] = item["keep"][matched[i, positive]]
                out = targets[mode]
                out["labels"][start:stop] = assigned.labels.numpy().astype(np.int16)
                out["reg"][start:stop] = assigned.reg.numpy()
                out["centerness"][start:stop] = assigned.centerness.numpy()
                out["matched"][start:stop] = matched.numpy().astype(np.int32)
            bar.update(len(batch))
    finally:
        bar.close()
    for array in list(features.values()) + [a for mode in targets.values() for a in mode.values()]:
        array.flush()
    del features, targets
    boxes = np.concatenate(gt_boxes) if gt_boxes else np.zeros((0, 4), np.float32)
    for name, array in (("gt_boxes", boxes.reshape(-1, 4)),
                        ("gt_labels", np.concatenate(gt_labels) if gt_labels else np.zeros(0, np.int64)),
                        ("gt_ignore", np.concatenate(gt_ignore) if gt_ignore else np.zeros(0, bool)),
                        ("gt_offsets", offsets), ("image_ids", image_ids), ("affine", affine),
                        ("orig_size", orig_size)):
        np.save(folder / f"{name}.npy", array, allow_pickle=False)
    return {"size": n, "num_objects": int(offsets[-1]),
            "num_trained_objects": int(sum(int((~ig).sum()) for ig in gt_ignore)),
            "positives": {mode: int((np.load(folder / f"labels{'' if mode == 'vanilla' else '_' + mode}.npy",
                                             mmap_mode="r") >= 0).sum()) for mode in fcos_modes}}


def build_cache(
    dataset: DetectionSet,
    out_dir: str | os.PathLike[str],
    *,
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    backbone_state: Mapping[str, Tensor] | None = None,
    detector_weights: str | os.PathLike[str] | None = None,
    crop: int = 384,
    meta_train: int | float = 0.7,
    meta_val: int | float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    threads: int | None = None,
    fcos: str = "vanilla",
    dtype: str = "float16",
    overwrite: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> FeatureCache:
    """Cache frozen-backbone features, FCOS targets and ground truth of ``dataset``'s crops in ``out_dir``.

    Args:
        dataset: the records to split into meta-train / meta-val (the paper: VOC's training images).
        backbone: a :func:`~nasfcos.nn.backbones.build_backbone` name.
        weights: a local backbone weights file (torchvision/timm layout); ``backbone_state``: a backbone state
            dict; ``detector_weights``: a ``nasfcos train`` file (``model_final.pt``) whose ``backbone.*``
            tensors are used (the paper fine-tunes the backbone on VOC first). None of them: random init
            (seeded by ``seed``).
        crop: short side, then a random ``crop x crop`` window (paper: 384).
        meta_train, meta_val: counts (int) or fractions of the dataset (float in (0, 1)); ``meta_val=None`` is
            the rest. The default 0.7 gives the paper's 4000 / 1715 on VOC's 5715 images.
        seed: decides the split, the crops and a random-init backbone.
        batch_size, device (``"auto"``: CUDA if available), threads (``torch.set_num_threads`` while caching),
        workers (image-decoding threads): speed only, not part of the cache's identity.
        fcos: ``"vanilla"`` caches FCOS v1 targets; ``"improved"`` caches both kinds.
        dtype: ``"float16"`` (paper-scale caches fit on disk) or ``"float32"``.
        overwrite: when ``out_dir`` holds a cache built from other inputs, rebuild it (``False``: UserError).
        progress: show a progress bar.

    Returns:
        The opened :class:`FeatureCache`; ``.reused`` says whether an identical cache was already there and
        ``.seconds`` how long building took.
    """
    start_time = time.perf_counter()
    root = Path(out_dir)
    from nasfcos.nn.backbones import BACKBONES

    if backbone not in BACKBONES:
        raise UserError(f"backbone: unknown name {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if not isinstance(crop, int) or isinstance(crop, bool) or crop < 32:
        raise UserError(f"crop: expected an integer >= 32 (got {crop!r})")
    if fcos not in FCOS_RULES:
        raise UserError(f"fcos: unknown mode {fcos!r}; expected vanilla or improved")
    if dtype not in DTYPES:
        raise UserError(f"dtype: unknown value {dtype!r}; expected float16 or float32")
    if batch_size < 1:
        raise UserError(f"batch_size: expected a positive integer (got {batch_size})")
    total = len(dataset)
    n_train = _resolve_count(meta_train, total, "meta_train")
    n_val = _resolve_count(meta_val, total, "meta_val", rest=total - n_train)
    if n_train < 1 or n_val < 1 or n_train + n_val > total:
        raise UserError(f"meta_train/meta_val: {n_train} + {n_val} images do not fit a dataset of {total} "
                        "images (each part needs at least one)")
    fcos_modes = ("vanilla",) if fcos == "vanilla" else ("vanilla", "improved")
    weights_id, loader = _weights_identity(backbone, weights, backbone_state, detector_weights)
    fingerprint = records_fingerprint(dataset)
    key = _cache_key(backbone=backbone, weights_id=weights_id, crop=crop, seed=seed, sizes=(n_train, n_val),
                     fingerprint=fingerprint, dtype=dtype, fcos_modes=fcos_modes)

    existing = _existing_key(root) if root.is_dir() else None
    if existing is not None and existing == key:
        cache = FeatureCache.open(root)
        cache.reused = True
        return cache
    if (root / MANIFEST).exists() and not overwrite:
        raise UserError(f"{root}: holds a feature cache built from other inputs; remove it, choose another "
                        "folder, or allow overwriting")

    train_set, val_set = dataset.split((n_train, n_val), seed=seed)
    resolved = _resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads: expected a positive integer (got {threads})")
        torch.set_num_threads(int(threads))
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".building-*"):  # left behind by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        net = _make_backbone(backbone, loader, seed).to(resolved)
        channels = dict(net.out_channels)
        with torch.inference_mode():
            probe = net(torch.zeros(1, 3, crop, crop, device=resolved))
        shapes = {level: [int(x) for x in probe[level].shape[1:]] for level in LEVELS}
        sizes = level_sizes(shapes)
        points = level_points(sizes, DEFAULT_STRIDES)
        workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
        split_stats = {}
        for name, part in (("train", train_set), ("val", val_set)):
            split_stats[name] = _write_split(
                part.records, staging / name, net, crop=crop, seed=seed, batch_size=batch_size, device=resolved,
                dtype=dtype, fcos_modes=fcos_modes, shapes=shapes, points=points,
                workers=workers, progress=progress, desc=f"caching {name}")
        # Swap in: the old manifest goes first, so a crash from here on leaves an invalid (rebuildable) cache.
        (root / MANIFEST).unlink(missing_ok=True)
        for name in SPLITS:
            if (root / name).exists():
                shutil.rmtree(root / name)
            os.replace(staging / name, root / name)
        seconds = time.perf_counter() - start_time
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
            "backbone": backbone, "weights": weights_id, "crop": int(crop), "seed": int(seed),
            "dataset": {"source": dataset.source, "num_images": total, "fingerprint": fingerprint},
            "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
            "category_ids": [int(c) for c in dataset.category_ids],
            "channels": channels, "feature_shapes": shapes, "dtype": dtype, "fcos_modes": list(fcos_modes),
            "strides": list(DEFAULT_STRIDES), "regress_ranges": key["ranges"],
            "level_sizes": [list(s) for s in sizes], "num_points": int(sum(int(p.shape[0]) for p in points)),
            "normalize": key["normalize"],
            "splits": split_stats,
            "requested": {"meta_train": meta_train, "meta_val": meta_val},
            "build": {"seconds": round(seconds, 3), "device": str(resolved), "batch_size": int(batch_size),
                      "torch": torch.__version__, "created_at": time.time()},
        }
        atomic_write_json(root / MANIFEST, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if threads is not None:
            torch.set_num_threads(old_threads)
    cache = FeatureCache.open(root)
    cache.seconds = time.perf_counter() - start_time
    return cache
