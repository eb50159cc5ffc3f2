"""COCO-format annotation files: read into a :class:`DetectionSet`, write one back.

The reader validates every field it uses with the same rules as ``nasfcos data check`` (see
:mod:`nasfcos.data.records`). With ``on_bad_box="skip"`` (default) bad annotations are dropped (boxes partly
outside the image are clipped and kept) and one warning counts what was done; with ``"error"`` the first
problem raises a :class:`UserError` naming the file, the field (``annotations[12].bbox``) and the value. A file
that is not COCO at all (malformed JSON, missing top-level keys, no categories) is always a ``UserError``.

Labels: categories sorted by id become labels ``0..K-1`` (COCO's 80 categories, ids 1..90 with gaps, map to
0..79); ``DetectionSet.category_ids[label]`` maps back.

Image paths: an absolute ``file_name`` is used as is. A relative one is resolved against ``image_root`` when
given; otherwise against the first of these folders that holds the first image: the JSON's folder, its
parent, ``<parent>/images/<stem>``, ``<parent>/<stem>``, ``<parent>/images`` — where ``<stem>`` is the JSON
name without an ``instances_`` prefix (``annotations/instances_val2017.json`` -> ``val2017/``, the official
COCO layout; ``annotations/train.json`` -> ``images/train/``, the synthetic layout). If none holds it, the
JSON's folder is used (``nasfcos data check`` then reports the missing images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nasfcos.data.records import (
    BOX_KIND,
    DetectionSet,
    ImageRecord,
    OnBadBox,
    Policy,
    ProblemLog,
    validate_box,
)
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, read_json

REQUIRED_KEYS = ("images", "annotations", "categories")


@dataclass
class CocoParse:
    """Everything the parser learnt: the set, the problems, and the ``images[i]`` index of each record."""

    dataset: DetectionSet
    log: ProblemLog
    image_fields: list[str]


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, float) and value.is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def default_image_root(annotation_file: Path, first_file_name: str | None) -> Path:
    """The folder relative image names resolve against when no ``image_root`` is given (see module doc)."""
    json_dir = annotation_file.resolve().parent
    stem = annotation_file.stem
    if stem.startswith("instances_"):
        stem = stem[len("instances_"):]
    candidates = [json_dir, json_dir.parent, json_dir.parent / "images" / stem, json_dir.parent / stem,
                  json_dir.parent / "images"]
    if first_file_name:
        for candidate in candidates:
            if (candidate / first_file_name).is_file():
                return candidate
    return json_dir


def _parse_categories(data: dict[str, Any], file: str, log: ProblemLog) -> tuple[list[int], list[str]]:
    categories = data["categories"]
    seen: dict[int, str] = {}
    for j, cat in enumerate(categories):
        where = f"categories[{j}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            value = cat.get("id") if isinstance(cat, dict) else cat
            raise UserError(f"{file}: {where}.id: {value!r}: expected an integer category id")
        cid = int(cat["id"])
        if cid in seen:
            log.add(file, f"{where}.id", cid, "duplicate category id", "duplicate_category_id")
            continue
        name = cat.get("name")
        seen[cid] = str(name) if isinstance(name, str) and name else str(cid)
    if not seen:
        raise UserError(f"{file}: categories: []: no categories; expected at least one")
    ids = sorted(seen)
    return ids, [seen[c] for c in ids]


def parse_coco(
    data: Any,
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    policy: Policy = "skip",
) -> CocoParse:
    """Validate and convert a loaded COCO dict. Used by :func:`read_coco` and by the checker."""
    path = Path(annotation_file)
    file = str(path)
    if not isinstance(data, dict):
        raise UserError(f"{file}: top level: {type(data).__name__}: expected a JSON object with keys "
                        f"{', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise UserError(f"{file}: {key}: missing: expected the COCO top-level keys {', '.join(REQUIRED_KEYS)}")
        if not isinstance(data[key], list):
            raise UserError(f"{file}: {key}: {type(data[key]).__name__}: expected a list")
    log = ProblemLog(policy)
    category_ids, class_names = _parse_categories(data, file, log)
    label_of = {c: i for i, c in enumerate(category_ids)}

    # Images.
    images: dict[int, dict[str, Any]] = {}
    image_order: list[int] = []
    image_field: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict):
            log.add(file, where, image, "expected an object", "malformed_image")
            continue
        bad = False
        if not _is_int(image.get("id")):
            log.add(file, f"{where}.id", image.get("id"), "expected an integer image id", "malformed_image")
            continue
        for key in ("width", "height"):
            value = image.get(key)
            if not _is_int(value) or int(value) <= 0:
                log.add(file, f"{where}.{key}", value, "expected a positive integer", "malformed_image")
                bad = True
                break
        if bad:
            continue
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            log.add(file, f"{where}.file_name", name, "expected a non-empty file name", "malformed_image")
            continue
        image_id = int(image["id"])
        if image_id in images:
            log.add(file, f"{where}.id", image_id, f"duplicate image id (first at {image_field[image_id]})",
                    "duplicate_image_id")
            continue
        images[image_id] = image
        image_order.append(image_id)
        image_field[image_id] = where

    # Annotations.
    per_image: dict[int, list[tuple[tuple[float, float, float, float], int, bool, float | None]]] = {
        i: [] for i in image_order}
    seen_ann_ids: dict[int, int] = {}
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict):
            log.add(file, where, ann, "expected an object", "malformed_annotation")
            continue
        ann_id = ann.get("id")
        if _is_int(ann_id):
            if int(ann_id) in seen_ann_ids:
                log.add(file, f"{where}.id", ann_id,
                        f"duplicate annotation id (first at annotations[{seen_ann_ids[int(ann_id)]}])",
                        "duplicate_annotation_id")
            else:
                seen_ann_ids[int(ann_id)] = k
        image_id = ann.get("image_id")
        if not _is_int(image_id) or int(image_id) not in images:
            log.add(file, f"{where}.image_id", image_id, "no image with this id", "unknown_image")
            continue
        category_id = ann.get("category_id")
        if not _is_int(category_id) or int(category_id) not in label_of:
            log.add(file, f"{where}.category_id", category_id, "not one of the categories' ids",
                    "unknown_category")
            continue
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox)):
            log.add(file, f"{where}.bbox", bbox, "expected [x, y, width, height] as 4 numbers", "malformed_box")
            continue
        image = images[int(image_id)]
        x, y, w, h = (float(v) for v in bbox)
        status, box, message = validate_box((x, y, x + w, y + h), int(image["width"]), int(image["height"]))
        if status != "ok":
            log.add(file, f"{where}.bbox", bbox, message, BOX_KIND[status])
            if box is None:
                continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            log.add(file, f"{where}.iscrowd", crowd, "expected 0 or 1", "malformed_annotation")
            continue
        area = ann.get("area")
        area_value = float(area) if _is_number(area) and np.isfinite(area) and area > 0 else None
        assert box is not None
        per_image[int(image_id)].append((box, label_of[int(category_id)], bool(crowd), area_value))

    first_name = images[image_order[0]]["file_name"] if image_order else None
    root = Path(image_root) if image_root is not None else default_image_root(path, first_name)
    records = []
    fields = []
    for image_id in image_order:
        image = images[image_id]
        objects = per_image[image_id]
        name = image["file_name"]
        image_path = Path(name) if os.path.isabs(name) else root / name
        areas = [o[3] for o in objects]
        records.append(ImageRecord(
            image_id=image_id, path=image_path, width=int(image["width"]), height=int(image["height"]),
            boxes=np.array([o[0] for o in objects], dtype=np.float32).reshape(-1, 4),
            labels=np.array([o[1] for o in objects], dtype=np.int64),
            iscrowd=np.array([o[2] for o in objects], dtype=bool),
            difficult=np.zeros(len(objects), dtype=bool), file_name=name,
            areas=None if any(a is None for a in areas) else np.array(areas, dtype=np.float32),
        ))
        fields.append(image_field[image_id])
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    dataset = DetectionSet(records, class_names, category_ids, f"coco:{path}", {"info": info, "image_root": str(root)})
    return CocoParse(dataset, log, fields)


def read_coco(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    on_bad_box: OnBadBox = "skip",
) -> DetectionSet:
    """Read a COCO detection annotation file into a :class:`DetectionSet` (see the module doc for rules)."""
    if on_bad_box not in ("skip", "error"):
        raise UserError(f"on_bad_box: {on_bad_box!r}: expected 'skip' or 'error'")
    path = Path(annotation_file)
    data = read_json(path, "COCO annotation file")
    parsed = parse_coco(data, path, image_root, on_bad_box)
    parsed.log.warn_summary(str(path))
    return parsed.dataset


def write_coco(
    dataset: DetectionSet,
    path: str | os.PathLike[str],
    *,
    info: dict[str, Any] | None = None,
    difficult_as_crowd: bool = True,
    indent: int | None = None,
) -> Path:
    """Write ``dataset`` as a COCO annotation file (atomically); ``info`` replaces the default info block.

    ``file_name`` entries are the records' ``file_name`` (as read), so the written file resolves its images
    the same way as the original when it sits in the same place.
    """
    coco = dataset.to_coco_dict(difficult_as_crowd=difficult_as_crowd)
    if info is not None:
        coco["info"] = info
    return atomic_write_json(path, coco, indent=indent)
