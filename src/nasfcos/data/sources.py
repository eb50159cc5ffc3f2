"""Resolve a data configuration (COCO, VOC or the built-in synthetic set) into :class:`DetectionSet` splits.

One place decides how a ``DataConfig`` becomes records, so training, evaluation, caching and the demo all
read data the same way and validate it with the same rules (``on_bad_box``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nasfcos.data.records import DetectionSet
from nasfcos.errors import UserError

__all__ = ["load_split", "DEFAULT_SYNTH_DIR"]

DEFAULT_SYNTH_DIR = Path("runs") / "data" / "synth"


def load_split(data: Any, split: str, *, seed: int = 0) -> DetectionSet | None:
    """The ``"train"`` or ``"val"`` split described by ``data`` (a ``DataConfig``); ``None`` if not configured.

    * ``coco``: ``train_path``/``val_path`` are annotation JSON files, ``*_images`` the image folders.
    * ``voc``: ``train_path``/``val_path`` are ``VOCdevkit`` roots, optionally ``ROOT:split`` (default
      ``trainval`` for train and ``test`` for val).
    * ``synthetic``: ``train_path`` is the folder of a set made by ``nasfcos data synth``, read as it is; if the
      folder has no set yet, one is made with the default parameters and ``seed``. Its ``val`` split is ``val``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' (got {split!r})")
    path = data.train_path if split == "train" else data.val_path
    images = data.train_images if split == "train" else data.val_images
    if data.format == "synthetic":
        from nasfcos.data.coco import read_coco
        from nasfcos.data.synthetic import ensure_synthetic

        root = Path(data.train_path) if data.train_path else DEFAULT_SYNTH_DIR
        if not (root / "manifest.json").is_file():  # an existing set is used as made, whatever its parameters
            ensure_synthetic(root, seed=seed)
        return read_coco(root / "annotations" / f"{split}.json", root / "images" / split, on_bad_box="error")
    if path is None:
        if split == "train":
            raise UserError(f"data.train_path: required for format {data.format!r}")
        return None
    if data.format == "coco":
        from nasfcos.data.coco import read_coco

        return read_coco(path, images, on_bad_box=data.on_bad_box)
    if data.format == "voc":
        from nasfcos.data.voc import read_voc

        root, _, voc_split = str(path).partition(":")
        voc_split = voc_split or ("trainval" if split == "train" else "test")
        return read_voc(root, voc_split, on_bad_box=data.on_bad_box)
    raise UserError(f"data.format: unknown value {data.format!r}; expected coco, voc or synthetic")
