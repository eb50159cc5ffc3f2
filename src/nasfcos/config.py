"""Typed configuration: frozen dataclasses, YAML files and ``--set a.b=value`` overrides.

Every tunable number of a run lives in a frozen dataclass whose defaults are the paper's values (FACTS 4 for
full training). A run is configured in three layers, later ones winning:

1. the dataclass defaults,
2. an optional YAML file whose nested mappings mirror the dataclass tree,
3. command-line overrides ``section.field=value`` (``--set solver.base_lr=0.02``).

The loader is generic: it walks any tree of (frozen) dataclasses using their type annotations, so other
modules define their own sections (``ProxyConfig``, ``SearchConfig``) and reuse :func:`load_config`.
Values are checked against the annotated type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``Optional[...]``, ``tuple[...]``, ``list[...]``, ``dict[str, ...]`` and nested dataclasses). A mistake in a
file or an override is a one-line :class:`~nasfcos.errors.UserError` naming the file (or ``--set``), the full
key path and the value, and for unknown keys listing the valid keys of that section.

A dataclass may validate its own values in ``__post_init__`` by raising ``ValueError``; the loader turns that
into a ``UserError`` naming the source and section. The resolved config of every run is written next to its
outputs with :func:`dump_config` and loads back to an equal object.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

from nasfcos.errors import UserError
from nasfcos.io import atomic_write_text

T = TypeVar("T")

__all__ = [
    "DataConfig",
    "ModelConfig",
    "RuntimeConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
]

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------------------------------------------
# Training configuration (FACTS 4: the FCOS recipe NAS-FCOS trains with)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """What detector to build.

    ``fpn_width``, ``head_width`` and ``concat`` default to ``None`` = "take them from the preset named by
    ``arch``" (every paper preset uses 256 / 256 / grouped); set them to override, or when ``arch`` is a
    genotype JSON file (then ``None`` means 256 / 256 / grouped).
    """

    arch: str = "nas-fcos"  # preset name (nasfcos.PRESETS) or path to a genotype JSON file
    backbone: str = "resnet50"
    num_classes: Optional[int] = None  # None = from the training data
    fpn_width: Optional[int] = None
    head_width: Optional[int] = None
    fcos: Literal["vanilla", "improved"] = "vanilla"
    concat: Optional[Literal["grouped", "dense"]] = None
    pretrained: Optional[str] = None  # local path to backbone weights (nothing is downloaded)
    freeze_at: int = 2  # stem + first stage frozen
    frozen_bn: bool = True
    # Inference (FACTS 4): per-level score threshold and top-k, class-aware NMS, detections kept per image.
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        _require(self.num_classes is None or self.num_classes >= 1, "num_classes", self.num_classes, ">= 1")
        for name in ("fpn_width", "head_width"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, value, ">= 1")
        _require(0 <= self.freeze_at <= 5, "freeze_at", self.freeze_at, "0..5")
        _require(0.0 <= self.score_thresh < 1.0, "score_thresh", self.score_thresh, "in [0, 1)")
        _require(0.0 < self.nms_thresh <= 1.0, "nms_thresh", self.nms_thresh, "in (0, 1]")
        _require(self.pre_nms_top_n >= 1, "pre_nms_top_n", self.pre_nms_top_n, ">= 1")
        _require(self.detections_per_img >= 1, "detections_per_img", self.detections_per_img, ">= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how training images are resized and augmented.

    ``train_path`` / ``val_path``: COCO annotation JSON, or a VOC year folder (``VOCdevkit/VOC2007``) or
    ``ImageSets/Main/<split>.txt`` file; unused for ``synthetic``. ``train_images`` / ``val_images``: the
    image folder for COCO (``None`` = next to the annotation file, as the data reader decides).
    """

    format: Literal["coco", "voc", "synthetic"] = "coco"
    train_path: Optional[str] = None
    train_images: Optional[str] = None
    val_path: Optional[str] = None
    val_images: Optional[str] = None
    min_size: tuple[int, ...] = (800,)  # short side; several values = multi-scale training (one drawn per image)
    max_size: int = 1333
    test_min_size: int = 800
    flip_prob: float = 0.5
    size_divisibility: int = 32
    on_bad_box: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        _require(len(self.min_size) >= 1 and all(s >= 1 for s in self.min_size), "min_size", self.min_size,
                 "one or more positive sizes")
        _require(self.max_size >= max(self.min_size), "max_size", self.max_size, ">= every min_size")
        _require(self.test_min_size >= 1, "test_min_size", self.test_min_size, ">= 1")
        _require(0.0 <= self.flip_prob <= 1.0, "flip_prob", self.flip_prob, "in [0, 1]")
        _require(self.size_divisibility >= 1, "size_divisibility", self.size_divisibility, ">= 1")


@dataclass(frozen=True)
class SolverConfig:
    """SGD with warmup and step decay, iteration based (FACTS 4: R-50 / MobileNetV2 1x schedule).

    ``batch_size`` is the total over all processes (16 = 8 GPUs x 2 images in FCOS, 4 x 4 in mmdetection).
    ``grad_clip_norm = 35`` is the usual cure for early NaN losses on small datasets; off by default as in
    the paper's recipe.
    """

    batch_size: int = 16
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    norm_weight_decay: Optional[float] = None  # None = same as weight_decay (the released recipe)
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3.0
    warmup_method: Literal["linear", "constant"] = "linear"
    max_iter: int = 90000
    steps: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    grad_clip_norm: Optional[float] = None
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        _require(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(self.bias_lr_factor > 0, "bias_lr_factor", self.bias_lr_factor, "> 0")
        _require(self.bias_weight_decay >= 0, "bias_weight_decay", self.bias_weight_decay, ">= 0")
        _require(self.norm_weight_decay is None or self.norm_weight_decay >= 0, "norm_weight_decay",
                 self.norm_weight_decay, ">= 0 or null")
        _require(self.warmup_iters >= 0, "warmup_iters", self.warmup_iters, ">= 0")
        _require(0.0 < self.warmup_factor <= 1.0, "warmup_factor", self.warmup_factor, "in (0, 1]")
        _require(self.max_iter >= 1, "max_iter", self.max_iter, ">= 1")
        _require(list(self.steps) == sorted(self.steps) and all(s > 0 for s in self.steps), "steps",
                 self.steps, "positive iterations in increasing order")
        _require(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm", self.grad_clip_norm,
                 "> 0 or null")


@dataclass(frozen=True)
class RuntimeConfig:
    """Seeds, workers, periods (in iterations; 0 = only at the end) and where the run folder goes."""

    seed: int = 0
    num_workers: int = 4
    checkpoint_period: int = 2500
    keep_checkpoints: int = 3  # 0 = keep all
    eval_period: int = 0
    log_period: int = 20
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    threads: Optional[int] = None  # torch.set_num_threads; None = torch's default
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None = derived from the arch and the time
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("num_workers", "checkpoint_period", "keep_checkpoints", "eval_period"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.log_period >= 1, "log_period", self.log_period, ">= 1")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or null")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                 or self.device == "mps", "device", self.device, "auto, cpu, cuda, cuda:N or mps")


@dataclass(frozen=True)
class TrainConfig:
    """Full training of one detector (``nasfcos train``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    """Raise the ``ValueError`` the loader turns into a ``UserError`` naming the source and key."""
    if not ok:
        raise ValueError(f"{name}: got {value!r}; expected {expected}")


# --------------------------------------------------------------------------------------------------------------
# Generic loader
# --------------------------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from its defaults, an optional YAML file and ``a.b=value`` override strings.

    Raises :class:`UserError` for a missing or malformed file, an unknown key, a value of the wrong type or a
    value its section rejects.
    """
    _check_dataclass_type(cls)
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    cfg = config_from_dict(cls, data, source=source)
    return apply_overrides(cfg, overrides)


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build ``cls`` from a nested mapping (missing keys keep their defaults), checking every key and value."""
    _check_dataclass_type(cls)
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping of sections at the top level (got {_short(data)})")
    return _build(cls, data, source, "")


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Return a copy of ``cfg`` with each ``a.b.c=value`` override applied, in order."""
    for text in overrides:
        key_path, raw = parse_override(text)
        cfg = _apply_one(cfg, key_path, raw, source=f"--set {text}")
    return cfg


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``"a.b=value"`` into ``(["a", "b"], "value")``; a malformed string is a ``UserError``."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE such as solver.base_lr=0.02")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise UserError(f"--set {text}: malformed key {key!r}; expected dotted names such as solver.base_lr")
    return parts, raw.strip()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists) — YAML and JSON friendly."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically; ``load_config(type(cfg), path)`` gives it back."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        """Sections as blocks, lists inline (``steps: [60000, 80000]``)."""

    _Dumper.add_representer(
        list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
    )
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------------------


def _check_dataclass_type(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level (got {_short(data)})")
    return data


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Field name -> (field, resolved type) for a dataclass type."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(source: str, cls: type, key_path: str, prefix: str) -> UserError:
    valid = ", ".join(_fields(cls))
    section = f"in '{prefix}'" if prefix else "at the top level"
    return UserError(f"{source}: unknown key '{key_path}'; valid keys {section}: {valid}")


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str) -> T:
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(source, cls, _join(prefix, str(key)), prefix)
        _, tp = fields[key]
        kwargs[key] = _coerce(value, tp, source, _join(prefix, key), from_text=False)
    return _construct(cls, kwargs, source, prefix)


def _construct(cls: type[T], kwargs: dict[str, Any], source: str, prefix: str) -> T:
    try:
        return cls(**kwargs)
    except ValueError as exc:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"{source}: {where}{exc}") from None


def _apply_one(cfg: T, key_path: list[str], raw: str, source: str, prefix: str = "") -> T:
    cls = type(cfg)
    fields = _fields(cls)
    name = key_path[0]
    full = _join(prefix, name)
    if name not in fields:
        raise _unknown_key(source, cls, _join(prefix, ".".join(key_path)), prefix)
    _, tp = fields[name]
    current = getattr(cfg, name)
    if len(key_path) > 1:
        if not dataclasses.is_dataclass(current):
            wanted = _join(prefix, ".".join(key_path))
            raise UserError(f"{source}: '{full}' is a value, not a section; cannot set '{wanted}'")
        new_value: Any = _apply_one(current, key_path[1:], raw, source, full)
    elif dataclasses.is_dataclass(current) and not isinstance(current, type):
        import yaml

        try:
            parsed = yaml.safe_load(raw) if raw else {}
        except yaml.YAMLError:
            parsed = raw
        if not isinstance(parsed, Mapping):
            keys = ", ".join(_fields(type(current)))
            raise UserError(f"{source}: '{full}' is a section; set one of its keys ({keys}) "
                            "or give a mapping such as {key: value}")
        merged = {**config_to_dict(current), **parsed}
        new_value = _build(type(current), merged, source, full)
    else:
        new_value = _coerce(raw, tp, source, full, from_text=True)
    kwargs = {n: getattr(cfg, n) for n in fields}
    kwargs[name] = new_value
    return _construct(cls, kwargs, source, prefix)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list, dict):
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(source: str, key: str, value: Any, tp: Any) -> UserError:
    return UserError(f"{source}: {key}: expected {_type_name(tp)} (got {_short(value)})")


def _coerce(value: Any, tp: Any, source: str, key: str, *, from_text: bool) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, numeric strings...).

    ``from_text`` is True for command-line values: they arrive as raw strings and are parsed here.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        if from_text:
            return _yaml_scalar(value)
        return value

    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        # Try str last so that "3" for Optional[int | str] becomes 3.
        options.sort(key=lambda a: a is str)
        for option in options:
            try:
                return _coerce(value, option, source, key, from_text=from_text)
            except UserError:
                continue
        raise _bad(source, key, value, tp)

    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if from_text and isinstance(value, str) and str(choice) == value.strip():
                return choice
        raise _bad(source, key, value, tp)

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if from_text and isinstance(value, str):
            value = _yaml_scalar(value)
        if value is None:  # `solver:` with nothing under it
            value = {}
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: {key}: expected a mapping for section '{key}' (got {_short(value)})")
        return _build(tp, value, source, key)

    if origin in (tuple, list):
        items = _as_sequence(value, from_text)
        if items is None:
            raise _bad(source, key, value, tp)
        if origin is list:
            item_types: list[Any] = [args[0] if args else Any] * len(items)
        elif not args or (len(args) == 2 and args[1] is Ellipsis):
            item_types = [args[0] if args else Any] * len(items)
        else:
            if len(items) != len(args):
                raise UserError(
                    f"{source}: {key}: expected {len(args)} values of {_type_name(tp)} (got {_short(value)})")
            item_types = list(args)
        converted = [_coerce(item, it, source, f"{key}[{i}]", from_text=from_text)
                     for i, (item, it) in enumerate(zip(items, item_types))]
        return tuple(converted) if origin is tuple else converted

    if origin is dict:
        if from_text and isinstance(value, str):
            value = _yaml_scalar(value)
        if not isinstance(value, Mapping):
            raise _bad(source, key, value, tp)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, source, f"{key}.{k}", from_text=False):
            _coerce(v, value_tp, source, f"{key}.{k}", from_text=from_text)
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise _bad(source, key, value, tp)

    if tp is int:
        if isinstance(value, bool):
            raise _bad(source, key, value, tp)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    raise _bad(source, key, value, tp) from None
                if as_float.is_integer():
                    return int(as_float)
        raise _bad(source, key, value, tp)

    if tp is float:
        if isinstance(value, bool):
            raise _bad(source, key, value, tp)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            parsed = _parse_float(value)
            if parsed is not None:
                return parsed
        raise _bad(source, key, value, tp)

    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads `run_name: 2024` as an int; a string field takes it verbatim.
            return str(value)
        raise _bad(source, key, value, tp)

    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")


def _parse_float(text: str) -> float | None:
    """Parse ``"1e-4"``, ``"0.01"``, ``"inf"`` or a fraction ``"1/3"``."""
    text = text.strip().replace("_", "")
    try:
        return float(text)
    except ValueError:
        pass
    if text.count("/") == 1:
        num, den = text.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _yaml_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _as_sequence(value: Any, from_text: bool) -> list[Any] | None:
    """Items of a list/tuple value.

    Text (a command-line value, or a quoted YAML string) may be ``[1, 2]``, ``(1, 2)``, ``1,2`` or ``1``; a
    lone YAML scalar (``min_size: 800``) is a one-item sequence.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("(") and text.endswith(")"):
            text = "[" + text[1:-1] + "]"
        if text.startswith("["):
            parsed = _yaml_scalar(text)
            return list(parsed) if isinstance(parsed, list) else None
        if text == "":
            return []
        return [part.strip() for part in text.split(",")]
    if isinstance(value, (bool, int, float)):
        return [value]
    return None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value
