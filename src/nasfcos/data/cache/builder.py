"""Building a feature cache: crop every image, run the frozen backbone once, assign FCOS targets, write arrays.

See :mod:`nasfcos.data.cache` for what is stored and why. Everything that decides the contents goes into the
manifest's ``key`` (:func:`_cache_key`); the same key reuses the existing cache, a different one rebuilds it in
a staging folder that is swapped in at the end, manifest last.
"""

from __future__ import annotations

import hashlib
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

from nasfcos.data.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DTYPES,
    FCOS_RULES,
    LEVELS,
    MANIFEST,
    SPLITS,
    crop_seed,
    level_sizes,
    records_fingerprint,
    target_suffix,
)
from nasfcos.data.cache.reader import FeatureCache
from nasfcos.data.loader import load_image, record_target
from nasfcos.data.records import DetectionSet, ImageRecord
from nasfcos.data.transforms import Normalize, RandomSquareCrop, ToTensor
from nasfcos.detection.points import level_points
from nasfcos.detection.targets import DEFAULT_RANGES, assign_targets_batch
from nasfcos.detection.weights import read_detector_file
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, file_sha256
from nasfcos.nn.device import resolve_device
from nasfcos.space.ops import FCOS_MODES, IMAGENET_MEAN, IMAGENET_STD, PYRAMID_STRIDES

__all__ = ["build_cache", "crop_record", "detector_backbone_state"]


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


def _state_sha256(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def detector_backbone_state(path: Path, backbone: str) -> dict[str, Tensor]:
    """The ``backbone.*`` tensors of a ``nasfcos train`` weights file (``model_final.pt`` or a checkpoint).

    The file's own description (its detector spec) says which backbone it holds; a different ``backbone`` is a
    :class:`UserError` naming both.
    """
    loaded = read_detector_file(path, require_spec=False)
    if loaded.backbone not in (None, backbone):
        raise UserError(f"{path}: the detector was trained with backbone {loaded.backbone!r}; "
                        f"expected {backbone!r} (--backbone)")
    found = {name[len("backbone."):]: value for name, value in loaded.state.items()
             if name.startswith("backbone.") and isinstance(value, Tensor)}
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
        return {"kind": "file", "sha256": file_sha256(path), "path": str(path)}, ("file", path)
    if detector_weights is not None:
        path = Path(detector_weights)
        if not path.is_file():
            raise UserError(f"{path}: detector weights file not found")
        state = detector_backbone_state(path, backbone)
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
        "strides": list(PYRAMID_STRIDES), "ranges": [[float(lo), float(hi)] for lo, hi in DEFAULT_RANGES],
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
        suffix = target_suffix(mode)
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
                assigned = assign_targets_batch(points, train_targets, PYRAMID_STRIDES, ranges=DEFAULT_RANGES,
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
            "positives": {mode: int((np.load(folder / f"labels{target_suffix(mode)}.npy",
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
        raise UserError(f"fcos: unknown mode {fcos!r}; expected one of {', '.join(FCOS_MODES)}")
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
    resolved = resolve_device(device)
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
        points = level_points(sizes, PYRAMID_STRIDES)
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
            "strides": list(PYRAMID_STRIDES), "regress_ranges": key["ranges"],
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
