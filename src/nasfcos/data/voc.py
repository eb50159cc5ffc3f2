"""PASCAL VOC (VOCdevkit layout) into a :class:`DetectionSet`.

Layout: ``root/VOC2007/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}``; ``root`` may
also point at one ``VOC<year>`` folder directly. ``years=None`` reads every ``VOC<year>`` folder found (sorted),
e.g. ``years=("2012",), split="train"`` is the paper's search set (5,717 images, split 4,000 / 1,715 by
:meth:`DetectionSet.split`).

Conventions (chosen here, so that every number is exact):

- Coordinates: VOC ``bndbox`` values are 1-based inclusive pixel indices; pixel ``i`` (1-based) covers the
  continuous interval ``[i-1, i)``. The 0-based continuous ``xyxy`` box is therefore
  ``(xmin - 1, ymin - 1, xmax, ymax)`` — a one-pixel object ``xmin = xmax = 5`` becomes ``[4, 5]``, width 1.
- Labels: the 20 VOC classes in the standard (alphabetical) order are labels 0..19, category ids 1..20.
  ``class_names`` can replace them for VOC-format custom data.
- Image ids: 1..N in reading order (years sorted, then the split file's order). VOC names cannot be turned
  into ids safely: VOC2012 holds ``2007_000027`` while VOC2007 holds an unrelated ``000027``.
- ``difficult`` objects are kept with ``difficult=True``; training leaves them out of the targets and
  :meth:`DetectionSet.to_coco_dict` writes them as ``iscrowd=1`` so that pycocotools ignores them, as the VOC
  protocol does.

XML is parsed with :mod:`xml.etree.ElementTree`; ``defusedxml`` is not a dependency, so any file that declares
a DOCTYPE or an ENTITY (the vehicle of entity-expansion attacks; VOC files never need one) is rejected.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
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

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_FORBIDDEN = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_YEAR_DIR = re.compile(r"^VOC(\d{4})$")


@dataclass
class VocParse:
    """The set, the problems, and the XML path of each record (used by the checker for image problems)."""

    dataset: DetectionSet
    log: ProblemLog
    image_fields: list[str]


def find_year_dirs(root: str | os.PathLike[str], years: Any = None) -> list[Path]:
    """The ``VOC<year>`` folders to read: ``root`` itself if it has ``Annotations/``, else its children."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{base}: VOC root folder not found")
    if years is not None:
        years = [str(y) for y in ([years] if isinstance(years, (int, str)) else years)]
    if (base / "Annotations").is_dir():
        match = _YEAR_DIR.match(base.name)
        if years is not None and match and match.group(1) not in years:
            raise UserError(f"{base}: years: {years}: this folder is VOC{match.group(1)}")
        return [base]
    found = {m.group(1): child for child in base.iterdir()
             if child.is_dir() and (m := _YEAR_DIR.match(child.name))}
    if years is None:
        if not found:
            raise UserError(f"{base}: no Annotations/ folder and no VOC<year>/ folders; expected a VOCdevkit "
                            "or a VOC<year> folder")
        return [found[y] for y in sorted(found)]
    missing = [y for y in years if y not in found]
    if missing:
        raise UserError(f"{base}: years: {missing}: no VOC{missing[0]}/ folder (found {sorted(found) or 'none'})")
    return [found[y] for y in years]


def _text(element: ET.Element | None, tag: str) -> str | None:
    if element is None:
        return None
    child = element.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def parse_voc_xml(xml_path: Path) -> ET.Element:
    """Parse one annotation XML, refusing DOCTYPE/ENTITY declarations; ``ValueError`` with a reason if bad."""
    data = xml_path.read_bytes()
    if _FORBIDDEN.search(data):
        raise ValueError("DOCTYPE/ENTITY declarations are not allowed")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"malformed XML ({exc})") from None


def _image_size_from_file(path: Path) -> tuple[int, int] | None:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.size
    except Exception:
        return None


def parse_voc(
    root: str | os.PathLike[str],
    split: str = "trainval",
    years: Any = None,
    policy: Policy = "skip",
    class_names: tuple[str, ...] | list[str] = VOC_CLASSES,
) -> VocParse:
    """Read and validate a VOC split; used by :func:`read_voc` and by the checker."""
    log = ProblemLog(policy)
    label_of = {name: i for i, name in enumerate(class_names)}
    records: list[ImageRecord] = []
    fields: list[str] = []
    year_dirs = find_year_dirs(root, years)
    for year_dir in year_dirs:
        split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            if policy != "collect":
                raise UserError(f"{split_file}: split: {split!r}: split file not found")
            log.add(split_file, "split", split, "split file not found", "missing_split")
            continue
        names = [line.split()[0] for line in split_file.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        for name in names:
            xml_path = year_dir / "Annotations" / f"{name}.xml"
            if not xml_path.is_file():
                log.add(xml_path, "Annotations", name, f"annotation XML not found (listed in {split_file.name})",
                        "missing_xml")
                continue
            try:
                tree = parse_voc_xml(xml_path)
            except (ValueError, OSError) as exc:
                log.add(xml_path, "xml", name, str(exc), "bad_xml")
                continue
            file_name = _text(tree, "filename") or f"{name}.jpg"
            image_path = year_dir / "JPEGImages" / f"{name}.jpg"
            if not image_path.is_file() and (year_dir / "JPEGImages" / file_name).is_file():
                image_path = year_dir / "JPEGImages" / file_name
            size = tree.find("size")
            width_text, height_text = _text(size, "width"), _text(size, "height")
            try:
                width, height = int(float(width_text or "")), int(float(height_text or ""))
                if width <= 0 or height <= 0:
                    raise ValueError
            except ValueError:
                # Some hand-made VOC-style files have no or zero size: take it from the image header.
                from_file = _image_size_from_file(image_path)
                if from_file is None:
                    log.add(xml_path, "size", f"{width_text}x{height_text}",
                            "missing or non-positive image size and the image cannot be read", "bad_xml")
                    continue
                width, height = from_file
            boxes, labels, difficult, truncated_flags = [], [], [], []
            for j, obj in enumerate(tree.findall("object")):
                where = f"object[{j}]"
                cls = _text(obj, "name")
                if cls not in label_of:
                    log.add(xml_path, f"{where}.name", cls, f"unknown class (expected one of {len(class_names)} "
                            f"names such as {class_names[0]!r})", "unknown_category")
                    continue
                bnd = obj.find("bndbox")
                raw = [_text(bnd, k) for k in ("xmin", "ymin", "xmax", "ymax")]
                try:
                    xmin, ymin, xmax, ymax = (float(v) for v in raw)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    log.add(xml_path, f"{where}.bndbox", raw, "expected numeric xmin, ymin, xmax, ymax",
                            "malformed_box")
                    continue
                status, box, message = validate_box((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height)
                if status != "ok":
                    log.add(xml_path, f"{where}.bndbox", raw, message, BOX_KIND[status])
                    if box is None:
                        continue
                assert box is not None
                diff = _text(obj, "difficult")
                boxes.append(box)
                labels.append(label_of[cls])
                difficult.append(diff not in (None, "", "0"))
                truncated_flags.append(_text(obj, "truncated") == "1")
            records.append(ImageRecord(
                image_id=len(records) + 1, path=image_path, width=width, height=height,
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), labels=np.array(labels, dtype=np.int64),
                iscrowd=np.zeros(len(boxes), dtype=bool), difficult=np.array(difficult, dtype=bool),
                file_name=f"{year_dir.name}/JPEGImages/{image_path.name}",
            ))
            fields.append(str(xml_path))
    dirs = ",".join(d.name for d in year_dirs)
    dataset = DetectionSet(records, list(class_names), list(range(1, len(class_names) + 1)),
                           f"voc:{Path(root)}[{dirs} {split}]", {"split": split})
    return VocParse(dataset, log, fields)


def read_voc(
    root: str | os.PathLike[str],
    split: str = "trainval",
    years: Any = None,
    *,
    on_bad_box: OnBadBox = "skip",
    class_names: tuple[str, ...] | list[str] = VOC_CLASSES,
) -> DetectionSet:
    """Read a VOC split into a :class:`DetectionSet` (conventions in the module doc).

    ``on_bad_box="skip"`` drops bad objects (and images whose XML is missing or unreadable), clips boxes partly
    outside the image and warns once with the counts; ``"error"`` raises :class:`UserError` at the first
    problem. A missing root, year folder or split file is always a :class:`UserError`.
    """
    if on_bad_box not in ("skip", "error"):
        raise UserError(f"on_bad_box: {on_bad_box!r}: expected 'skip' or 'error'")
    parsed = parse_voc(root, split, years, on_bad_box, class_names)
    parsed.log.warn_summary(parsed.dataset.source)
    return parsed.dataset
