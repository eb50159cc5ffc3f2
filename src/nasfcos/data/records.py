"""In-memory detection annotations: one :class:`ImageRecord` per image, a :class:`DetectionSet` per dataset.

Every reader (COCO, VOC, synthetic) produces the same shape of data so that the transforms, the loaders, the
feature cache and the evaluation never look at a file format again. Inside the library boxes are ``xyxy``
float pixels in the original image (0-based, continuous: pixel ``i`` covers ``[i, i+1)``), labels are
contiguous ``0..K-1`` and the dataset's own category ids live only in ``DetectionSet.category_ids``.

This module also holds the problem bookkeeping shared by the readers and ``nasfcos data check``
(:class:`Problem`, :class:`ProblemLog`, :func:`validate_box`): the reader used for training and the checker run
the very same validation, so what ``check`` reports is exactly what the reader skips, clips or rejects.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nasfcos.errors import UserError

OnBadBox = Literal["skip", "error"]
Policy = Literal["skip", "error", "collect"]

#: Boxes may poke out of the image by up to this many pixels without being reported (they are clipped
#: silently). COCO has boxes that exceed the image border by a fraction of a pixel from float rounding.
BORDER_TOLERANCE = 1.0


# --------------------------------------------------------------------------------------------------------------
# Problems shared by readers and the checker
# --------------------------------------------------------------------------------------------------------------

#: Human wording of each problem kind, used in the one-line summary warning of the readers.
KIND_TEXT: dict[str, str] = {
    "clipped_box": "boxes partly outside the image (clipped, kept)",
    "outside_box": "boxes entirely outside the image (dropped)",
    "degenerate_box": "zero or negative size boxes (dropped)",
    "malformed_box": "malformed boxes (dropped)",
    "unknown_category": "annotations with an unknown category (dropped)",
    "unknown_image": "annotations of unknown image ids (dropped)",
    "duplicate_image_id": "duplicate image ids (later images dropped)",
    "duplicate_annotation_id": "duplicate annotation ids (kept)",
    "duplicate_category_id": "duplicate category ids (later ones dropped)",
    "malformed_image": "malformed image entries (dropped)",
    "malformed_annotation": "malformed annotation entries (dropped)",
    "missing_xml": "images without an annotation XML (dropped)",
    "bad_xml": "unreadable annotation XMLs (image dropped)",
    "missing_split": "missing split files",
    "missing_image": "missing image files",
    "corrupt_image": "unreadable image files",
    "size_mismatch": "images whose size differs from the annotation",
    "bad_label": "labels outside 0..K-1",
}


def _short_repr(value: Any, limit: int = 80) -> str:
    """A one-line, bounded representation of an offending value for messages."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, field), what value, what is wrong, and its kind."""

    file: str
    field: str
    value: str
    message: str
    kind: str = "other"

    def line(self) -> str:
        """``FILE: FIELD: VALUE: MESSAGE`` — the format of ``nasfcos data check`` and of reader errors."""
        return f"{self.file}: {self.field}: {self.value}: {self.message}"


class ProblemLog:
    """Collects problems under a policy.

    ``"error"`` raises :class:`UserError` with the first problem's line; ``"skip"`` and ``"collect"`` keep every
    problem (the reader then drops or clips the offending item and :meth:`warn_summary` emits one counted
    line; the checker reports them all).
    """

    def __init__(self, policy: Policy) -> None:
        if policy not in ("skip", "error", "collect"):
            raise UserError(f"on_bad_box: unknown policy (got {policy!r}); expected 'skip' or 'error'")
        self.policy = policy
        self.problems: list[Problem] = []

    def add(self, file: str | Path, field_name: str, value: Any, message: str, kind: str) -> Problem:
        problem = Problem(str(file), field_name, _short_repr(value), message, kind)
        if self.policy == "error":
            raise UserError(problem.line())
        self.problems.append(problem)
        return problem

    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def warn_summary(self, source: str, stacklevel: int = 3) -> None:
        """One summary warning with the count of each kind of problem (nothing if the data was clean)."""
        counts = self.counts()
        if not counts:
            return
        parts = [f"{n} {KIND_TEXT.get(kind, kind)}" for kind, n in sorted(counts.items())]
        first = self.problems[0]
        warnings.warn(
            f"{source}: " + "; ".join(parts) + f" (first: {first.line()}; run `nasfcos data check` for all)",
            DataWarning,
            stacklevel=stacklevel,
        )


class DataWarning(UserWarning):
    """Warning category for skipped or clipped annotations."""


BoxStatus = Literal["ok", "clipped", "outside", "degenerate", "malformed"]


def validate_box(
    box: Sequence[Any], width: float, height: float, tolerance: float = BORDER_TOLERANCE
) -> tuple[BoxStatus, tuple[float, float, float, float] | None, str]:
    """Validate one ``xyxy`` box against its image; return ``(status, clipped_box_or_None, message)``.

    - ``malformed``: not four finite numbers. ``degenerate``: ``x2 <= x1`` or ``y2 <= y1``.
    - ``outside``: nothing of the box is left after clipping to ``[0, W] x [0, H]`` (zero area).
    - ``clipped``: part of the box lies more than ``tolerance`` pixels outside; the clipped box is returned and
      kept by the readers (the visible part is still a correct target).
    - ``ok``: inside (up to ``tolerance``, silently clipped).
    """
    try:
        if isinstance(box, (str, bytes)) or len(box) != 4:
            return "malformed", None, "expected 4 numbers"
        values = [float(v) for v in box if not isinstance(v, (bool, str, bytes))]
    except (TypeError, ValueError):
        return "malformed", None, "expected 4 numbers"
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return "malformed", None, "expected 4 finite numbers"
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        return "degenerate", None, f"zero or negative size box (width {x2 - x1:g}, height {y2 - y1:g})"
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        return "outside", None, f"box entirely outside the {width:g}x{height:g} image"
    clipped = (cx1, cy1, cx2, cy2)
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return "clipped", clipped, f"box extends outside the {width:g}x{height:g} image"
    return "ok", clipped, ""


BOX_KIND = {"clipped": "clipped_box", "outside": "outside_box", "degenerate": "degenerate_box",
            "malformed": "malformed_box"}


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


def _frozen_array(value: Any, dtype: Any, shape_tail: tuple[int, ...], name: str) -> np.ndarray:
    array = np.array(value, dtype=dtype, copy=True)
    if array.size == 0:
        array = array.reshape((0, *shape_tail))
    if array.ndim != 1 + len(shape_tail) or array.shape[1:] != shape_tail:
        raise ValueError(f"ImageRecord.{name}: bad shape {array.shape}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its objects.

    ``boxes``: ``float32 [M, 4]`` ``xyxy`` pixels of the original image; ``labels``: ``int64 [M]`` in
    ``0..K-1``; ``iscrowd`` / ``difficult``: ``bool [M]`` (crowd regions from COCO; VOC "difficult" objects).
    Both kinds are kept in the record; the training loader leaves them out of the targets and the COCO
    evaluation treats them as ignore regions. ``file_name`` is the name as written in the source file (used
    when writing COCO JSON back); ``areas`` is the source's ``area`` field (COCO: segment area, which decides
    the small/medium/large split of the evaluation) or ``None`` for the box area. Arrays are read-only.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    difficult: np.ndarray
    file_name: str = ""
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "image_id", int(self.image_id))
        set_(self, "path", Path(self.path))
        set_(self, "width", int(self.width))
        set_(self, "height", int(self.height))
        set_(self, "boxes", _frozen_array(self.boxes, np.float32, (4,), "boxes"))
        m = len(self.boxes)
        set_(self, "labels", _frozen_array(self.labels, np.int64, (), "labels"))
        set_(self, "iscrowd", _frozen_array(self.iscrowd if self.iscrowd is not None else np.zeros(m), bool, (),
                                            "iscrowd"))
        set_(self, "difficult", _frozen_array(self.difficult if self.difficult is not None else np.zeros(m),
                                              bool, (), "difficult"))
        if self.areas is not None:
            set_(self, "areas", _frozen_array(self.areas, np.float32, (), "areas"))
        for name in ("labels", "iscrowd", "difficult") + (("areas",) if self.areas is not None else ()):
            if len(getattr(self, name)) != m:
                raise ValueError(f"ImageRecord.{name}: length {len(getattr(self, name))} != {m} boxes")
        if not self.file_name:
            set_(self, "file_name", self.path.name)

    @property
    def num_objects(self) -> int:
        return int(len(self.boxes))

    def select(self, keep: np.ndarray) -> ImageRecord:
        """A copy with only the objects where ``keep`` (bool mask or index array) selects."""
        return ImageRecord(
            self.image_id, self.path, self.width, self.height, self.boxes[keep], self.labels[keep],
            self.iscrowd[keep], self.difficult[keep], self.file_name,
            None if self.areas is None else self.areas[keep],
        )


@dataclass
class DetectionSet:
    """A dataset: records, class names (index = label), original category ids (index = label), a source note.

    ``category_ids[label]`` is the dataset's own id for a contiguous label (COCO ids 1..90 with gaps; VOC and
    synthetic 1..K). ``source`` says where it came from (for messages and run records).
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records = list(self.records)
        self.class_names = [str(n) for n in self.class_names]
        self.category_ids = [int(c) for c in self.category_ids]
        if len(self.class_names) != len(self.category_ids):
            raise ValueError("DetectionSet: class_names and category_ids differ in length")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError("DetectionSet: duplicate category ids")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_objects(self) -> int:
        return sum(r.num_objects for r in self.records)

    def label_of_category(self, category_id: int) -> int:
        """Contiguous label of a dataset category id (``KeyError`` if unknown)."""
        return {c: i for i, c in enumerate(self.category_ids)}[int(category_id)]

    def _with_records(self, records: list[ImageRecord], note: str) -> DetectionSet:
        return DetectionSet(records, list(self.class_names), list(self.category_ids),
                            f"{self.source}{note}", dict(self.meta))

    def subset(self, indices: Iterable[int]) -> DetectionSet:
        """The records at ``indices`` (in the given order), same classes."""
        idx = [int(i) for i in indices]
        return self._with_records([self.records[i] for i in idx], f"[subset of {len(idx)}]")

    def split(self, sizes: float | int | Sequence[int], seed: int = 0) -> tuple[DetectionSet, DetectionSet]:
        """Deterministic random split into two disjoint parts (e.g. the paper's meta-train / meta-val).

        ``sizes`` is a fraction in ``(0, 1)`` for the first part (the rest is the second), an int (size of the
        first part), or a pair ``(n_first, n_second)`` with ``n_first + n_second <= len(self)``. The same seed
        gives the same split; each part keeps the original record order.
        """
        n = len(self.records)
        if isinstance(sizes, float):
            if not 0.0 < sizes < 1.0:
                raise UserError(f"split: fraction must lie in (0, 1) (got {sizes})")
            first, second = int(round(sizes * n)), n - int(round(sizes * n))
        elif isinstance(sizes, int):
            first, second = sizes, n - sizes
        else:
            if len(sizes) != 2:
                raise UserError(f"split: expected two counts (got {list(sizes)})")
            first, second = int(sizes[0]), int(sizes[1])
        if first < 0 or second < 0 or first + second > n:
            raise UserError(f"split: sizes {first} + {second} do not fit a dataset of {n} images")
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED])).permutation(n)
        part1 = sorted(order[:first].tolist())
        part2 = sorted(order[first:first + second].tolist())
        return (self._with_records([self.records[i] for i in part1], f"[split {first}/{n} seed {seed}]"),
                self._with_records([self.records[i] for i in part2], f"[split {second}/{n} seed {seed}]"))

    def to_coco_dict(self, *, difficult_as_crowd: bool = True, include_crowd: bool = True) -> dict[str, Any]:
        """A COCO ground-truth dict that ``pycocotools.coco.COCO`` accepts (set ``coco.dataset`` then
        ``coco.createIndex()``).

        Boxes become ``xywh``; ``category_id`` is the original id; annotation ids run from 1 (COCOeval treats a
        matched id of 0 as "unmatched", so 0 must never be used). ``area`` is the source's area when known,
        else the box area. With ``difficult_as_crowd`` (default), VOC "difficult" objects are written with
        ``iscrowd=1``: pycocotools then ignores detections matched to them, as the VOC protocol does (note
        that pycocotools measures overlap with a crowd region as intersection over the detection's area).
        """
        images, annotations = [], []
        ann_id = 1
        for record in self.records:
            images.append({"id": record.image_id, "file_name": record.file_name,
                           "width": record.width, "height": record.height})
            for j in range(record.num_objects):
                x1, y1, x2, y2 = (float(v) for v in record.boxes[j])
                crowd = bool(record.iscrowd[j]) or (difficult_as_crowd and bool(record.difficult[j]))
                if crowd and not include_crowd:
                    continue
                w, h = x2 - x1, y2 - y1
                area = float(record.areas[j]) if record.areas is not None else w * h
                annotations.append({
                    "id": ann_id, "image_id": record.image_id,
                    "category_id": self.category_ids[int(record.labels[j])],
                    "bbox": [x1, y1, w, h], "area": area, "iscrowd": int(crowd),
                })
                ann_id += 1
        categories = [{"id": c, "name": n, "supercategory": "object"}
                      for c, n in zip(self.category_ids, self.class_names)]
        return {"info": {"description": f"nasfcos export of {self.source}"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}

    def to_coco(self, **kwargs: Any) -> Any:
        """A ``pycocotools.coco.COCO`` ground truth built in memory from :meth:`to_coco_dict`."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.to_coco_dict(**kwargs)
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
