"""Resolve a data configuration (COCO, VOC or the built-in synthetic set) into :class:`DetectionSet` splits.

One place decides how a ``DataConfig`` becomes records, so training, evaluation, caching and the demo all
read data the same way and validate it with the same rules (``on_bad_box``).

Reading never creates anything: a synthetic set is made only by ``nasfcos data synth`` (and the demo, which
says so). A missing or wrong path is a one-line :class:`UserError` naming the option (or config key) and the
path, raised by :func:`check_data_paths` before any file or folder is touched, so a typo in ``--data`` costs
nothing instead of generating a data set at the mistyped path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nasfcos.data.records import DetectionSet
from nasfcos.errors import UserError

__all__ = ["load_split", "check_data_paths", "synthetic_root", "DEFAULT_SYNTH_DIR", "DEFAULT_LABELS"]

DEFAULT_SYNTH_DIR = Path("runs") / "data" / "synth"

#: How errors name each path of a ``DataConfig`` unless the caller says otherwise (the CLI passes its flags).
DEFAULT_LABELS: dict[str, str] = {
    "train_path": "data.train_path",
    "train_images": "data.train_images",
    "val_path": "data.val_path",
    "val_images": "data.val_images",
}

_SYNTH_HINT = "expected the folder of a synthetic set made by `nasfcos data synth --out FOLDER`"


def synthetic_root(data: Any) -> Path:
    """The folder a synthetic ``DataConfig`` reads: ``train_path``, or ``runs/data/synth`` when not given."""
    return Path(data.train_path) if data.train_path else DEFAULT_SYNTH_DIR


def _label(labels: Mapping[str, str] | None, key: str) -> str:
    return (labels or {}).get(key, DEFAULT_LABELS[key])


def _require_file(path: Path, label: str, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{label}: {path}: is a folder; expected {what}")
    if not path.is_file():
        raise UserError(f"{label}: {path}: not found; expected {what}")


def _require_folder(path: Path, label: str, what: str) -> None:
    if path.is_file():
        raise UserError(f"{label}: {path}: is a file; expected {what}")
    if not path.is_dir():
        raise UserError(f"{label}: {path}: folder not found; expected {what}")


def _check_synthetic(data: Any, labels: Mapping[str, str] | None) -> None:
    root = synthetic_root(data)
    label = _label(labels, "train_path")
    if not data.train_path:
        label = f"{label} (not given; default {DEFAULT_SYNTH_DIR})"
    hint = _SYNTH_HINT
    if root.is_file():
        raise UserError(f"{label}: {root}: is a file; {hint}")
    if not root.is_dir():
        raise UserError(f"{label}: {root}: folder not found; {hint}")
    if not (root / "manifest.json").is_file():
        raise UserError(f"{label}: {root}: not a synthetic set (no manifest.json); {hint}")
    for split in ("train", "val"):
        annotations = root / "annotations" / f"{split}.json"
        images = root / "images" / split
        if not annotations.is_file() or not images.is_dir():
            missing = annotations if not annotations.is_file() else images
            raise UserError(
                f"{label}: {root}: incomplete synthetic set (no {missing.relative_to(root).as_posix()}); "
                f"remake it with `nasfcos data synth --force --out {root}`"
            )


def check_data_paths(data: Any, labels: Mapping[str, str] | None = None) -> None:
    """Raise a one-line :class:`UserError` if a path of ``data`` (a ``DataConfig``) is missing or the wrong kind.

    ``labels`` maps ``train_path``/``train_images``/``val_path``/``val_images`` to the names errors use
    (default: the config keys, see :data:`DEFAULT_LABELS`). Checks only what exists where, reads nothing.
    """
    if data.format == "synthetic":
        _check_synthetic(data, labels)
        return
    if data.format not in ("coco", "voc"):
        raise UserError(f"data.format: unknown value {data.format!r}; expected coco, voc or synthetic")
    if data.train_path is None:
        raise UserError(f"{_label(labels, 'train_path')}: required for format {data.format!r}")
    for split in ("train", "val"):
        path = getattr(data, f"{split}_path")
        if path is None:
            continue
        label = _label(labels, f"{split}_path")
        if data.format == "coco":
            _require_file(Path(path), label, "a COCO annotation JSON file")
            images = getattr(data, f"{split}_images")
            if images is not None:
                _require_folder(Path(images), _label(labels, f"{split}_images"), "the folder of the COCO images")
        else:
            root = Path(str(path).partition(":")[0]) if not Path(path).exists() else Path(path)
            _require_folder(root, label, "a VOCdevkit folder, optionally ROOT:split")


def load_split(data: Any, split: str, *, seed: int = 0, labels: Mapping[str, str] | None = None) -> DetectionSet | None:
    """The ``"train"`` or ``"val"`` split described by ``data`` (a ``DataConfig``); ``None`` if not configured.

    * ``coco``: ``train_path``/``val_path`` are annotation JSON files, ``*_images`` the image folders.
    * ``voc``: ``train_path``/``val_path`` are ``VOCdevkit`` roots, optionally ``ROOT:split`` (default
      ``trainval`` for train and ``test`` for val).
    * ``synthetic``: ``train_path`` (default ``runs/data/synth``) is the folder of a set made by
      ``nasfcos data synth``, read as it is; its ``val`` split is the set's ``val``. A folder without a set is
      an error, never generated here.

    Paths are checked first (:func:`check_data_paths`, errors named by ``labels``). ``seed`` is accepted for
    callers that pass their run seed; reading is deterministic and does not use it.
    """
    del seed
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    check_data_paths(data, labels)
    path = data.train_path if split == "train" else data.val_path
    images = data.train_images if split == "train" else data.val_images
    if data.format == "synthetic":
        from nasfcos.data.coco import read_coco

        root = synthetic_root(data)
        return read_coco(root / "annotations" / f"{split}.json", root / "images" / split, on_bad_box="error")
    if path is None:
        return None
    if data.format == "coco":
        from nasfcos.data.coco import read_coco

        return read_coco(path, images, on_bad_box=data.on_bad_box)
    from nasfcos.data.voc import read_voc

    root, _, voc_split = str(path).partition(":")
    voc_split = voc_split or ("trainval" if split == "train" else "test")
    return read_voc(root, voc_split, on_bad_box=data.on_bad_box)
