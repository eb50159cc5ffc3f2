"""The feature cache's on-disk format: names, version, manifest checks, and the pure functions that decide
what a cache holds (crop seeds, pyramid sizes, record fingerprints).

The layout (one folder per split, ``.npy`` arrays, ``manifest.json`` written last) is described in
:mod:`nasfcos.data.cache`; :mod:`~nasfcos.data.cache.reader` opens a cache and
:mod:`~nasfcos.data.cache.builder` writes one, both against the names and checks defined here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nasfcos.data.records import DetectionSet
from nasfcos.errors import UserError
from nasfcos.space.ops import BACKBONE_FEATURES, NUM_LEVELS

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DTYPES",
    "FCOS_RULES",
    "LEVELS",
    "MANIFEST",
    "SPLITS",
    "check_manifest",
    "crop_seed",
    "expected_arrays",
    "level_sizes",
    "records_fingerprint",
    "target_suffix",
]

CACHE_FORMAT = "nasfcos-feature-cache"
CACHE_VERSION = 1
LEVELS: tuple[str, ...] = BACKBONE_FEATURES
SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")

#: Target-assignment options of each FCOS flavour (FACTS 4). Distances stay in pixels in both: the decoder's
#: head outputs pixels in both modes (see :mod:`nasfcos.nn.heads`).
FCOS_RULES: dict[str, dict[str, Any]] = {
    "vanilla": {"center_sampling_radius": None, "normalize_by_stride": False},
    "improved": {"center_sampling_radius": 1.5, "normalize_by_stride": False},
}


def target_suffix(mode: str) -> str:
    """File-name suffix of the targets of FCOS flavour ``mode`` (``labels.npy``, ``labels_improved.npy``)."""
    return "" if mode == "vanilla" else f"_{mode}"


def crop_seed(seed: int, image_id: int) -> int:
    """Seed of image ``image_id``'s random crop: a function of ``(seed, image_id)`` only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, 0xCAC4E, int(image_id) & 0xFFFF_FFFF_FFFF_FFFF])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def level_sizes(feature_shapes: Mapping[str, Sequence[int]], num_levels: int = NUM_LEVELS) -> list[tuple[int, int]]:
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


_REQUIRED_KEYS = ("format", "version", "key", "backbone", "crop", "seed", "num_classes", "class_names",
                  "category_ids", "channels", "feature_shapes", "dtype", "fcos_modes", "strides", "level_sizes",
                  "num_points", "splits")


def check_manifest(manifest: Any, where: Path) -> None:
    """:class:`UserError` unless ``manifest`` is a complete manifest of this format version."""
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


def expected_arrays(manifest: Mapping[str, Any], split: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{array name: (shape, dtype)}`` that split ``split`` of a cache with this manifest must hold."""
    n = int(manifest["splits"][split]["size"])
    m = int(manifest["splits"][split]["num_objects"])
    p = int(manifest["num_points"])
    arrays: dict[str, tuple[tuple[int, ...], str]] = {
        level: ((n, *(int(x) for x in manifest["feature_shapes"][level])), manifest["dtype"]) for level in LEVELS
    }
    for mode in manifest["fcos_modes"]:
        suffix = target_suffix(mode)
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
