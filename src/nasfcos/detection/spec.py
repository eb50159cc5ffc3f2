"""What a detector is: one frozen description that builds it, is saved with its weights and rebuilds it.

A :class:`DetectorSpec` holds every choice that shapes an :class:`~nasfcos.detection.detector.FCOSDetector`:
the genotype, backbone, classes, widths, FCOS flavour, concat flavour, backbone freezing, input resizing and the
inference settings (``score_thresh``, ``nms_thresh``, ``pre_nms_top_n``, ``detections_per_img``). Training
writes it into ``model_final.pt`` and every checkpoint; ``nasfcos eval``, ``nasfcos predict`` and ``nasfcos
cache --detector-weights`` rebuild from it, so a model is evaluated exactly as it was trained.

Widths: where they come from (:meth:`DetectorSpec.resolve`), in this order:

1. an explicit width (``fpn_width`` / ``head_width``: the config's ``model.fpn_width``, which ``--fpn-width``
   and ``--set`` override like any config key);
2. the arch's width suffix (``"nas-fcos@128"`` or ``"nas-fcos@128-256"``);
3. the preset's own widths (256 / 256 for every paper preset and for a genotype file).

An explicit width and a suffix that **disagree** are a one-line :class:`~nasfcos.errors.UserError` (the width
would otherwise be chosen silently); when they agree, either may be given. ``concat`` is the explicit value,
else the preset's (``grouped`` for a genotype file).

Files written before the spec existed carry a flat ``meta`` dict instead; :meth:`DetectorSpec.from_legacy_meta`
derives the spec from it with the rules those files were trained with (inference settings at their defaults,
which is what those versions used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.space.genotype import Genotype
from nasfcos.space.ops import CONCAT_MODES, FCOS_MODES, is_int, one_of
from nasfcos.space.presets import PRESETS, get_preset, resolve_preset

__all__ = ["SPEC_VERSION", "DetectorSpec", "arch_suffix_widths"]

SPEC_VERSION = 1


def arch_suffix_widths(arch: Any) -> tuple[int, int] | None:
    """``(fpn_width, head_width)`` set by an arch's ``@W`` / ``@F-H`` suffix, or ``None`` without a suffix."""
    if not isinstance(arch, str) or "@" not in arch or Path(arch).is_file():
        return None
    if arch.split("@", 1)[0] not in PRESETS:
        return None
    preset = get_preset(arch)  # UserError for a malformed suffix
    return preset.fpn_width, preset.head_width


def _pick_width(label: str, explicit: int | None, suffix: int | None, preset: int, arch: Any) -> int:
    if explicit is not None and suffix is not None and int(explicit) != int(suffix):
        raise UserError(
            f"{label}: {explicit} conflicts with arch {arch!r}, whose @ suffix sets this width to {suffix}; "
            f"give the width once (in the suffix or in {label}) or make both equal"
        )
    if explicit is not None:
        return int(explicit)
    return int(suffix) if suffix is not None else int(preset)


#: Spec fields read from a ``ModelConfig`` under the same name, and from a ``DataConfig`` (spec name: config key).
_MODEL_CONFIG_FIELDS = ("backbone", "fpn_width", "head_width", "fcos", "concat", "freeze_at", "frozen_bn",
                        "score_thresh", "nms_thresh", "pre_nms_top_n", "detections_per_img")
_DATA_CONFIG_FIELDS = {"min_size": "min_size", "test_min_size": "test_min_size", "max_size": "max_size",
                       "size_divisible": "size_divisibility"}
#: Spec fields that are keyword arguments of the decoder and of the detector module.
_DECODER_FIELDS = ("fpn_width", "head_width", "fcos", "concat")
_DETECTOR_FIELDS = ("fcos", "min_size", "test_min_size", "max_size", "size_divisible", "score_thresh", "nms_thresh",
                    "pre_nms_top_n", "detections_per_img")


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that decides a detector's modules and outputs (weights excluded). Frozen; lists become tuples.

    ``min_size``: short side(s) to resize to (one drawn per training image), ``None`` keeps the input size;
    ``test_min_size``: short side at inference (``None``: the last ``min_size``).
    """

    genotype: Genotype
    backbone: str = "resnet50"
    num_classes: int = 80
    fpn_width: int = 256
    head_width: int = 256
    fcos: str = "vanilla"
    concat: str = "grouped"
    freeze_at: int = 2
    frozen_bn: bool = True
    min_size: tuple[int, ...] | None = (800,)
    test_min_size: int | None = None
    max_size: int = 1333
    size_divisible: int = 32
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    pre_nms_top_n: int = 1000
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if is_int(self.min_size):
            object.__setattr__(self, "min_size", (int(self.min_size),))  # type: ignore[arg-type]
        elif self.min_size is not None:
            object.__setattr__(self, "min_size", tuple(int(s) for s in self.min_size))
        if not isinstance(self.genotype, Genotype):
            raise UserError(f"spec.genotype: expected a nasfcos.Genotype (got {type(self.genotype).__name__})")
        self.genotype.validate()
        if self.fcos not in FCOS_MODES:
            raise UserError(f"spec.fcos: unknown mode {self.fcos!r}; expected one of {one_of(FCOS_MODES)}")
        if self.concat not in CONCAT_MODES:
            raise UserError(f"spec.concat: unknown mode {self.concat!r}; expected one of {one_of(CONCAT_MODES)}")
        if not is_int(self.num_classes) or self.num_classes < 1:
            raise UserError(f"num_classes: must be >= 1 (got {self.num_classes})")
        for name in ("fpn_width", "head_width", "max_size", "size_divisible", "pre_nms_top_n", "detections_per_img"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UserError(f"spec.{name}: expected a positive integer (got {value!r})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def resolve(
        cls,
        arch: Any,
        *,
        fpn_width: int | None = None,
        head_width: int | None = None,
        concat: str | None = None,
        labels: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> DetectorSpec:
        """The spec of ``arch`` (a preset name with an optional width suffix, a genotype JSON path, a
        ``Preset`` or a ``Genotype``) with the width precedence of the module docstring.

        ``labels`` name ``fpn_width``/``head_width`` in errors (``{"fpn_width": "--fpn-width"}``; default: the
        field names); ``fields`` are the other :class:`DetectorSpec` fields (``backbone``, ``num_classes``,
        ``score_thresh``, ...).
        """
        allowed = {f.name for f in dataclasses.fields(cls)} - {"genotype", "fpn_width", "head_width", "concat"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise TypeError(f"DetectorSpec.resolve: unknown option(s) {', '.join(unknown)}")
        preset = resolve_preset(arch)
        suffix = arch_suffix_widths(arch)
        names = {"fpn_width": "fpn_width", "head_width": "head_width", **(labels or {})}
        fpn = _pick_width(names["fpn_width"], fpn_width, suffix[0] if suffix else None, preset.fpn_width, arch)
        head = _pick_width(names["head_width"], head_width, suffix[1] if suffix else None, preset.head_width, arch)
        return cls(genotype=preset.genotype.validate(), fpn_width=fpn, head_width=head,
                   concat=concat if concat is not None else preset.concat, **fields)

    @classmethod
    def from_config(cls, model: Any, data: Any, num_classes: int) -> DetectorSpec:
        """The spec of a training config's ``model`` and ``data`` sections (``ModelConfig``, ``DataConfig``)."""
        fields = {name: getattr(model, name) for name in _MODEL_CONFIG_FIELDS}
        fields.update({name: getattr(data, key) for name, key in _DATA_CONFIG_FIELDS.items()})
        fields["min_size"] = tuple(fields["min_size"])
        return cls.resolve(model.arch, num_classes=int(num_classes),
                           labels={"fpn_width": "model.fpn_width", "head_width": "model.head_width"}, **fields)

    def decoder_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~nasfcos.nn.decoder.Decoder` besides genotype, channels and classes."""
        return {name: getattr(self, name) for name in _DECODER_FIELDS}

    def detector_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~nasfcos.detection.detector.FCOSDetector` besides its modules and classes."""
        return {name: getattr(self, name) for name in _DETECTOR_FIELDS}

    # ------------------------------------------------------------------ plain data (weights_only-safe)
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (the genotype as its JSON dict, tuples as lists), plus ``version``."""
        out: dict[str, Any] = {"version": SPEC_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "genotype":
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "spec") -> DetectorSpec:
        """Parse :meth:`to_dict`'s output; a malformed or newer spec is a :class:`UserError` naming ``source``."""
        if not isinstance(data, Mapping):
            raise UserError(f"{source}: the detector spec is not a mapping (got {type(data).__name__})")
        version = data.get("version")
        if version != SPEC_VERSION:
            raise UserError(f"{source}: detector spec version {version!r}; this nasfcos reads version {SPEC_VERSION}"
                            " (upgrade nasfcos or retrain)")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names) - {"version"})
        if unknown:
            raise UserError(f"{source}: unknown detector spec key(s) {', '.join(unknown)}; expected {one_of(tuple(names))}")
        if "genotype" not in data:
            raise UserError(f"{source}: the detector spec has no genotype")
        try:
            genotype = Genotype.from_dict(data["genotype"])
            values = {k: data[k] for k in names if k in data and k != "genotype"}
            if isinstance(values.get("min_size"), list):
                values["min_size"] = tuple(values["min_size"])
            return cls(genotype=genotype, **values)
        except UserError as exc:
            raise UserError(f"{source}: {exc.message}") from None

    @classmethod
    def from_legacy_meta(cls, meta: Mapping[str, Any], source: str = "meta") -> DetectorSpec:
        """The spec of a file written before specs existed (a flat ``meta``: genotype JSON, widths, sizes).

        As those versions built it: the saved genotype; a width or concat that was ``None`` in the config came
        from the arch (preset, suffix included) else 256 / grouped; inference settings were never saved, so
        they are the defaults those versions always used.
        """
        try:
            genotype = Genotype.from_json(meta["genotype"])
            arch = meta.get("arch")
            try:
                preset = resolve_preset(arch) if isinstance(arch, str) and arch else resolve_preset(genotype)
            except UserError:  # the arch was a genotype file that is gone: its genotype is in the meta
                preset = resolve_preset(genotype)
            min_size = meta.get("min_size", (800,))
            return cls(
                genotype=genotype,
                backbone=meta["backbone"],
                num_classes=int(meta["num_classes"]),
                fpn_width=int(meta.get("fpn_width") or preset.fpn_width),
                head_width=int(meta.get("head_width") or preset.head_width),
                fcos=meta.get("fcos") or "vanilla",
                concat=meta.get("concat") or preset.concat,
                min_size=tuple(min_size) if isinstance(min_size, Sequence) else min_size,
                test_min_size=meta.get("test_min_size"),
                max_size=int(meta.get("max_size", 1333)),
                size_divisible=int(meta.get("size_divisible", 32)),
            )
        except KeyError as exc:
            raise UserError(f"{source}: the model description has no {exc.args[0]!r}; "
                            "expected a file written by nasfcos train") from None
        except UserError as exc:
            raise UserError(f"{source}: {exc.message}") from None

    def replace(self, **changes: Any) -> DetectorSpec:
        """A copy with ``changes`` (validated like any spec)."""
        return dataclasses.replace(self, **changes)
