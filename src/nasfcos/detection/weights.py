"""Detector weights files: what ``nasfcos train`` writes and what eval, predict and the feature cache read.

A weights file (``model_final.pt``) is a dict of plain data, read with ``weights_only=True``::

    {"model": state_dict, "spec": DetectorSpec.to_dict(), "meta": {"class_names": [...], "category_ids": [...],
     "arch": "nas-fcos@128"}}

A training checkpoint (:mod:`nasfcos.train.checkpoint`) holds the same ``spec`` and ``meta`` under ``extra``.
``spec`` rebuilds the detector exactly (:func:`~nasfcos.detection.detector.build_detector`), inference settings
included; ``meta`` holds what belongs to the data (class names, the dataset's category ids) and the arch as it
was written. Files from before the spec carry only a flat ``meta``; the spec is derived from it
(:meth:`DetectorSpec.from_legacy_meta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from nasfcos.detection.detector import FCOSDetector, build_detector
from nasfcos.detection.spec import DetectorSpec
from nasfcos.errors import UserError
from nasfcos.io import safe_torch_load

__all__ = ["DetectorFile", "detector_payload", "load_trained_model", "read_detector_file"]

_WRAPPER_PREFIX = "module."


def detector_payload(state: Mapping[str, Tensor], spec: DetectorSpec, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The dict :func:`read_detector_file` reads back (``meta``: plain data, e.g. class names)."""
    return {"model": dict(state), "spec": spec.to_dict(), "meta": dict(meta)}


@dataclass(frozen=True)
class DetectorFile:
    """A weights file's parts: the tensors, the detector spec (``None`` when the file describes no model) and
    the data meta."""

    path: Path
    state: dict[str, Tensor]
    spec: DetectorSpec | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> str | None:
        """The backbone the weights were trained with, when the file says."""
        if self.spec is not None:
            return self.spec.backbone
        value = self.meta.get("backbone")
        return value if isinstance(value, str) else None

    def describe(self) -> dict[str, Any]:
        """One flat dict: every spec field (genotype as its JSON dict) and the data meta (class names, ...)."""
        described = dict(self.meta)
        if self.spec is not None:
            described.update(self.spec.to_dict())
        return described


def read_detector_file(path: str | Path, *, require_spec: bool = True) -> DetectorFile:
    """Read a ``nasfcos train`` weights file or training checkpoint (safe: ``weights_only``).

    ``require_spec=False`` also accepts a file whose description is missing or incomplete (a bare state dict,
    a meta without the genotype); its ``spec`` is then ``None``. ``module.`` prefixes are stripped.
    """
    source = Path(path)
    blob = safe_torch_load(source, "detector weights")
    if not isinstance(blob, Mapping):
        raise UserError(f"{source}: not a detector weights file (expected a dict, got {type(blob).__name__})")
    state = blob.get("model") if isinstance(blob.get("model"), Mapping) else None
    described: Mapping[str, Any] = blob
    if state is None:
        if not require_spec and blob and all(isinstance(v, Tensor) for v in blob.values()):
            state, described = blob, {}
        else:
            raise UserError(f"{source}: not a nasfcos model file (expected keys 'model' and 'spec')")
    elif "spec" not in blob and "meta" not in blob and isinstance(blob.get("extra"), Mapping):
        described = blob["extra"]  # a training checkpoint
    raw_meta = described.get("meta")
    meta = dict(raw_meta) if isinstance(raw_meta, Mapping) else {}
    spec: DetectorSpec | None = None
    if "spec" in described:
        spec = DetectorSpec.from_dict(described["spec"], source=f"{source}: spec")
    elif meta:
        try:
            spec = DetectorSpec.from_legacy_meta(meta, source=str(source))
        except UserError:
            if require_spec:
                raise
    if spec is None and require_spec:
        raise UserError(f"{source}: the file has no model description ('spec'); was it written by nasfcos train?")
    clean = {(k[len(_WRAPPER_PREFIX):] if str(k).startswith(_WRAPPER_PREFIX) else str(k)): v for k, v in state.items()}
    return DetectorFile(path=source, state=clean, spec=spec, meta=meta)


def load_trained_model(path: str | Path, **overrides: Any) -> tuple[FCOSDetector, dict[str, Any]]:
    """The detector a weights file describes, with its weights loaded; and the file's description.

    Rebuilt from the saved spec exactly (widths, resizing and inference settings as trained); ``overrides``
    change spec fields (``score_thresh=0.3``). The description is :meth:`DetectorFile.describe`.
    """
    loaded = read_detector_file(path)
    assert loaded.spec is not None
    spec = loaded.spec.replace(**overrides) if overrides else loaded.spec
    model = build_detector(spec)
    missing, unexpected = model.load_state_dict(loaded.state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(
            f"{loaded.path}: weights do not match the described model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected; first: {first})"
        )
    described = loaded.describe()
    if overrides:
        described.update(spec.to_dict())
    return model, described
