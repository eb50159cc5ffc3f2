"""``nasfcos data check``: find every problem in a COCO or VOC dataset before a long run trips on it.

The checker runs the readers' own validation in "collect" mode (so it reports exactly what
``read_coco``/``read_voc`` would skip, clip or reject) and then, with ``verify_images``, opens and fully decodes
every image to find missing files, corrupt or truncated files and images whose real size differs from the
annotated one (which would silently misplace every box).

A file that is not a dataset at all (malformed JSON, missing top-level keys, no categories, a missing root)
raises a one-line :class:`UserError` instead of a report.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nasfcos.data.coco import parse_coco
from nasfcos.data.records import BOX_KIND, DetectionSet, ImageRecord, Problem, ProblemLog, validate_box
from nasfcos.data.voc import VOC_CLASSES, parse_voc
from nasfcos.errors import UserError
from nasfcos.io import read_json

__all__ = ["CheckReport", "Problem", "check_dataset", "detect_format", "verify_image"]

Format = Literal["coco", "voc"]


@dataclass
class CheckReport:
    """All problems found and a summary (counts of images, objects, classes and problems per kind)."""

    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """Every problem as ``FILE: FIELD: VALUE: MESSAGE``."""
        return [p.line() for p in self.problems]

    def summary_line(self) -> str:
        s = self.summary
        head = (f"summary: {s.get('images', 0)} images, {s.get('objects', 0)} objects, "
                f"{s.get('classes', 0)} classes ({s.get('source', '')})")
        if not self.problems:
            return head + ": no problems found"
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(s.get("problems_by_kind", {}).items()))
        return head + f": {len(self.problems)} problems ({kinds})"


def verify_image(path: Path, width: int, height: int) -> tuple[str, str, str] | None:
    """Open and fully decode one image; ``None`` if fine, else ``(kind, value, message)``."""
    if not path.is_file():
        return "missing_image", path.name, "image file not found"
    try:
        from PIL import Image

        with Image.open(path) as image:
            size = image.size
            image.load()  # full decode: catches truncated and corrupt data that open()/verify() miss
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return "corrupt_image", path.name, f"cannot decode image ({message})"
    if size != (width, height):
        return "size_mismatch", f"{size[0]}x{size[1]}", f"real size differs from the annotated {width}x{height}"
    return None


def _verify_images(records: list[ImageRecord], fields: list[str], format_: str, workers: int | None) -> list[Problem]:
    jobs = [(r.path, r.width, r.height) for r in records]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        results = list(pool.map(lambda job: verify_image(*job), jobs))
    problems = []
    for record, where, result in zip(records, fields, results):
        if result is None:
            continue
        kind, value, message = result
        field_name = f"{where}.file_name" if format_ != "voc" else "JPEGImages"
        if kind == "size_mismatch":
            field_name = f"{where}.width/height" if format_ != "voc" else "size"
        problems.append(Problem(str(record.path), field_name, value, message, kind))
    return problems


def _check_records(dataset: DetectionSet, log: ProblemLog) -> list[str]:
    """Validate an in-memory set (boxes, labels, duplicate ids); returns the field name of each record."""
    file = dataset.source or "<DetectionSet>"
    seen: dict[int, int] = {}
    fields = []
    for i, record in enumerate(dataset.records):
        where = f"records[{i}]"
        fields.append(where)
        if record.image_id in seen:
            log.add(file, f"{where}.image_id", record.image_id,
                    f"duplicate image id (first at records[{seen[record.image_id]}])", "duplicate_image_id")
        else:
            seen[record.image_id] = i
        for j in range(record.num_objects):
            status, _, message = validate_box(record.boxes[j].tolist(), record.width, record.height)
            if status != "ok":
                log.add(file, f"{where}.boxes[{j}]", record.boxes[j].tolist(), message, BOX_KIND[status])
            label = int(record.labels[j])
            if not 0 <= label < dataset.num_classes:
                log.add(file, f"{where}.labels[{j}]", label, f"label outside 0..{dataset.num_classes - 1}", "bad_label")
    return fields


def detect_format(path: Path) -> Format:
    """``coco`` for a ``.json`` file, ``voc`` for a folder with ``Annotations/`` or ``VOC<year>/`` folders."""
    if path.is_file():
        return "coco"
    if path.is_dir():
        if (path / "Annotations").is_dir() or any(c.is_dir() and c.name.startswith("VOC") for c in path.iterdir()):
            return "voc"
        if (path / "annotations").is_dir():
            return "coco"
        raise UserError(f"{path}: cannot tell the dataset format (no .json file, no Annotations/, no VOC<year>/, "
                        "no annotations/*.json); pass --format")
    raise UserError(f"{path}: dataset path not found")


def _coco_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted((path / "annotations").glob("*.json")) if path.is_dir() else []
    if not files:
        raise UserError(f"{path}: no COCO annotation file (expected a .json file or a folder with annotations/*.json)")
    return files


def check_dataset(
    dataset: str | os.PathLike[str] | DetectionSet,
    *,
    verify_images: bool = True,
    format: Format | None = None,
    image_root: str | os.PathLike[str] | None = None,
    split: str = "trainval",
    years: Any = None,
    class_names: tuple[str, ...] | list[str] = VOC_CLASSES,
    workers: int | None = None,
) -> CheckReport:
    """Check a COCO JSON file (or a folder with ``annotations/*.json``), a VOC root, or a loaded set.

    Returns a :class:`CheckReport`; raises :class:`UserError` for input that is not a dataset at all.
    """
    problems: list[Problem] = []
    parts: list[tuple[DetectionSet, list[str], str]] = []
    if isinstance(dataset, DetectionSet):
        log = ProblemLog("collect")
        fields = _check_records(dataset, log)
        problems.extend(log.problems)
        parts.append((dataset, fields, "set"))
        format_name = "records"
    else:
        path = Path(dataset)
        fmt = format or detect_format(path)
        if fmt not in ("coco", "voc"):
            raise UserError(f"--format: {fmt!r}: expected 'coco' or 'voc'")
        format_name = fmt
        if fmt == "coco":
            for file in _coco_files(path):
                parsed = parse_coco(read_json(file, "COCO annotation file"), file, image_root, "collect")
                problems.extend(parsed.log.problems)
                parts.append((parsed.dataset, parsed.image_fields, "coco"))
        else:
            parsed_voc = parse_voc(path, split, years, "collect", class_names)
            problems.extend(parsed_voc.log.problems)
            parts.append((parsed_voc.dataset, parsed_voc.image_fields, "voc"))
    if verify_images:
        for part, fields, kind in parts:
            problems.extend(_verify_images(part.records, fields, kind, workers))
    by_kind = Counter(p.kind for p in problems)
    summary = {
        "format": format_name,
        "source": "; ".join(p[0].source for p in parts),
        "images": sum(len(p[0]) for p in parts),
        "objects": sum(p[0].num_objects for p in parts),
        "classes": parts[0][0].num_classes if parts else 0,
        "images_verified": verify_images,
        "problems": len(problems),
        "problems_by_kind": dict(sorted(by_kind.items())),
    }
    return CheckReport(problems, summary)
