"""Settings of a proxy-fidelity study (``nasfcos fidelity``), as frozen dataclasses loaded from YAML (torch-free).

A study has four parts, each a section of the file (``configs/fidelity-cpu.yaml`` is the CPU preset):

- ``data`` / ``backbone``: the synthetic set and the search backbone (trained here with ``fpn-fcos`` like the
  demo's backbone stage, or an existing backbone state dict given by ``backbone.weights``);
- ``decoders``: ``random`` samples from the search space (``space``, sampled with ``seed``; duplicates skipped)
  plus the named ``presets``, all built at the same width (``reference.width`` for full training, each proxy's
  ``width`` for the proxy);
- ``reference`` / ``seed_spread``: full training of every decoder (whole detector on the search backbone, COCO AP
  on the validation split) with one fixed budget and every seed of ``reference.seeds`` (the reference AP is the
  mean over them: k seeds cut its noise by sqrt(k)); ``seed_spread.decoders`` are trained again with every seed of
  ``seed_spread.seeds`` to measure the seed-to-seed noise at that budget;
- ``proxies``: a list of named proxy settings, each a feature cache (``cache.crop``, ``cache.images``) and a
  :class:`~nasfcos.search.config.ProxyConfig`. ``proxy_defaults`` holds the ProxyConfig keys every setting shares;
  a setting's own ``proxy`` keys win. Early stopping is always off in a study (every decoder is scored fully).

Mistakes (an unknown key, a wrong type, a duplicate setting name, a seed-spread decoder that is not in the study)
are one-line :class:`~nasfcos.errors.UserError` naming the file and key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nasfcos.config import _read_yaml, _require, apply_overrides, config_from_dict
from nasfcos.search.config import ProxyConfig, SpaceConfig

__all__ = [
    "BackboneSettings",
    "CacheSettings",
    "DecoderSet",
    "FidelityConfig",
    "ProxySetting",
    "ReferenceSettings",
    "SeedSpreadSettings",
    "StudyData",
    "load_fidelity_config",
    "random_name",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def random_name(index: int) -> str:
    """The name of the ``index``-th (1-based) random decoder of a study: ``random-01``, ``random-02``, ..."""
    return f"random-{index:02d}"


@dataclass(frozen=True)
class StudyData:
    """The synthetic detection set (``nasfcos.data.synthetic``): reference training on ``train``, AP on ``val``;
    the proxies' meta-train / meta-val caches are cut from ``train`` only."""

    seed: int = 0
    num_train: int = 320
    num_val: int = 192
    image_size: int = 128
    num_classes: int = 6

    def __post_init__(self) -> None:
        _require(self.num_train >= 4, "num_train", self.num_train, ">= 4")
        _require(self.num_val >= 1, "num_val", self.num_val, ">= 1")
        _require(self.image_size >= 64, "image_size", self.image_size, ">= 64")


@dataclass(frozen=True)
class BackboneSettings:
    """The search backbone: ``weights`` (a backbone state dict such as a demo's ``backbone/backbone.pt``) or,
    when ``None``, ``name`` trained from scratch with the ``fpn-fcos`` decoder for ``iters`` steps (the demo's
    backbone stage: the paper fine-tunes its backbone on the search data first, Sec. 4.1)."""

    name: str = "resnet18"
    weights: Optional[str] = None
    iters: int = 230
    batch_size: int = 8
    base_lr: float = 0.01
    width: int = 64

    def __post_init__(self) -> None:
        _require(self.iters >= 1, "iters", self.iters, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        _require(self.width >= 2, "width", self.width, ">= 2")


@dataclass(frozen=True)
class DecoderSet:
    """Which decoders are compared: ``random`` samples of the space (seeded) plus ``presets`` by name."""

    random: int = 9
    seed: int = 0
    presets: tuple[str, ...] = ("fpn-fcos", "nas-fcos", "deformable-fpn-fcos")
    space: SpaceConfig = field(default_factory=SpaceConfig)

    def __post_init__(self) -> None:
        _require(self.random >= 0, "random", self.random, ">= 0")
        _require(len(set(self.presets)) == len(self.presets), "presets", list(self.presets), "distinct names")
        _require(self.random + len(self.presets) >= 2, "random", self.random,
                 "enough decoders to rank (random + presets >= 2)")


@dataclass(frozen=True)
class ReferenceSettings:
    """Full training of one decoder (:func:`nasfcos.train.trainer.train`): the detector of ``backbone.name`` with
    the search backbone's weights, the decoder at ``width`` (FPN and head), ``iters`` SGD steps (warm-up
    ``iters // 5`` capped at 50, steps at 75 % and 90 %), stages below ``freeze_at`` frozen (5: the backbone is
    frozen, only the decoder trains, as in the demo's final training; 0: everything trains). Every decoder is
    trained once per seed of ``seeds``; its reference AP is the mean over them."""

    width: int = 64
    iters: int = 400
    batch_size: int = 8
    base_lr: float = 0.01
    freeze_at: int = 5
    grad_clip_norm: Optional[float] = 35.0
    seeds: tuple[int, ...] = (0,)
    checkpoint_period: int = 100  # resume granularity of an interrupted training (not part of the result)

    def __post_init__(self) -> None:
        _require(self.width >= 2, "width", self.width, ">= 2")
        _require(self.iters >= 1, "iters", self.iters, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        _require(0 <= self.freeze_at <= 5, "freeze_at", self.freeze_at, "0..5")
        _require(self.checkpoint_period >= 1, "checkpoint_period", self.checkpoint_period, ">= 1")
        _require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", list(self.seeds),
                 "one or more distinct seeds")


@dataclass(frozen=True)
class SeedSpreadSettings:
    """Decoders (study names: a preset or ``random-NN``) trained with every seed of ``seeds``."""

    decoders: tuple[str, ...] = ("fpn-fcos", "nas-fcos")
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        _require(len(set(self.decoders)) == len(self.decoders), "decoders", list(self.decoders), "distinct names")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds", list(self.seeds), "distinct seeds")
        _require(not self.decoders or len(self.seeds) >= 2, "seeds", list(self.seeds),
                 "at least 2 seeds when decoders are listed")


@dataclass(frozen=True)
class CacheSettings:
    """A feature cache of the search backbone: ``images`` of the training split (``None``: all) cut into
    ``meta_train`` / rest meta-val, one random ``crop x crop`` window each."""

    crop: int = 128
    images: Optional[int] = None
    meta_train: float = 0.75

    def __post_init__(self) -> None:
        _require(self.crop >= 32, "crop", self.crop, ">= 32")
        _require(self.images is None or self.images >= 4, "images", self.images, ">= 4 or null")
        _require(0 < self.meta_train < 1, "meta_train", self.meta_train, "in (0, 1)")


@dataclass(frozen=True)
class ProxySetting:
    """One proxy setting: a name (used in file names and tables), its cache and its proxy task. ``seed`` is the
    search seed the candidate seeds derive from (:func:`nasfcos.search.loop.candidate_seed`), so a setting scores
    a decoder exactly as a search with that seed would."""

    name: str = ""
    cache: CacheSettings = field(default_factory=CacheSettings)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(bool(_NAME.match(self.name)), "name", self.name,
                 "a non-empty name of letters, digits, '.', '_' or '-'")


def _default_proxies() -> tuple[ProxySetting, ...]:
    """The settings of ``configs/fidelity-cpu.yaml``: the demo's proxy before the study, the earlier
    ``configs/proxy-cpu.yaml``'s, more epochs, half the cached images (the study's choice for the CPU presets)."""
    cpu = dict(batch_size=32, lr=8e-4, device="cpu", threads=1, early_stop=False, compute_ap=True)
    return (
        ProxySetting(name="demo-w16-e3", proxy=ProxyConfig(width=16, epochs=3, **cpu)),
        ProxySetting(name="w32-e4", proxy=ProxyConfig(width=32, epochs=4, **{**cpu, "batch_size": 16})),
        ProxySetting(name="w16-e6", proxy=ProxyConfig(width=16, epochs=6, **cpu)),
        ProxySetting(name="w16-e3-n160", cache=CacheSettings(images=160), proxy=ProxyConfig(width=16, epochs=3, **cpu)),
    )


@dataclass(frozen=True)
class FidelityConfig:
    """A whole study (module docstring). ``threads``: torch threads of the reference trainings and of the
    backbone/cache stages (the proxies use their own ``threads``). ``bootstrap``: resamples per interval;
    ``level``: interval coverage; ``top_k``: the overlap reported."""

    threads: int = 2
    data: StudyData = field(default_factory=StudyData)
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    decoders: DecoderSet = field(default_factory=DecoderSet)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    seed_spread: SeedSpreadSettings = field(default_factory=SeedSpreadSettings)
    proxy_defaults: ProxyConfig = field(default_factory=ProxyConfig)
    proxies: tuple[ProxySetting, ...] = field(default_factory=_default_proxies)
    bootstrap: int = 2000
    level: float = 0.95
    top_k: int = 3

    def __post_init__(self) -> None:
        _require(self.threads >= 1, "threads", self.threads, ">= 1")
        _require(self.bootstrap >= 1, "bootstrap", self.bootstrap, ">= 1")
        _require(0 < self.level < 1, "level", self.level, "in (0, 1)")
        _require(self.top_k >= 1, "top_k", self.top_k, ">= 1")
        _require(len(self.proxies) >= 1, "proxies", list(self.proxies), "at least one proxy setting")
        names = [setting.name for setting in self.proxies]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        _require(not duplicates, "proxies", duplicates, "distinct setting names")
        known = set(self.decoder_names())
        unknown = [name for name in self.seed_spread.decoders if name not in known]
        _require(not unknown, "seed_spread.decoders", unknown,
                 f"names of the study's decoders ({', '.join(self.decoder_names())})")

    def decoder_names(self) -> tuple[str, ...]:
        """The study's decoder names in order: the presets, then ``random-01`` .. ``random-NN``."""
        return (*self.decoders.presets, *(random_name(i + 1) for i in range(self.decoders.random)))


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _with_proxy_defaults(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The raw file with ``proxy_defaults`` folded under every ``proxies[i].proxy`` (the setting's keys win)."""
    from nasfcos.errors import UserError

    out = dict(data)
    defaults = out.get("proxy_defaults") or {}
    if not isinstance(defaults, Mapping):
        raise UserError(f"{source}: proxy_defaults: expected a mapping of ProxyConfig keys (got {defaults!r})")
    proxies = out.get("proxies")
    if proxies is None:
        return out
    if not isinstance(proxies, list):
        raise UserError(f"{source}: proxies: expected a list of proxy settings (got {type(proxies).__name__})")
    merged = []
    for index, setting in enumerate(proxies):
        if not isinstance(setting, Mapping):
            raise UserError(f"{source}: proxies[{index}]: expected a mapping with name, cache, proxy "
                            f"(got {setting!r})")
        own = setting.get("proxy") or {}
        if not isinstance(own, Mapping):
            raise UserError(f"{source}: proxies[{index}].proxy: expected a mapping of ProxyConfig keys (got {own!r})")
        merged.append({**setting, "proxy": _merge(defaults, own)})
    out["proxies"] = merged
    return out


def load_fidelity_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                         *, base: str | Path | None = None) -> FidelityConfig:
    """The :class:`FidelityConfig` of defaults <- ``base`` (a run's saved ``config.yaml``) <- ``path`` <-
    ``overrides`` (``reference.iters=200``; the ``proxies`` list can only be replaced by a file)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    for layer in (base, path):
        if layer is None:
            continue
        source = str(layer)
        raw = _with_proxy_defaults(_read_yaml(Path(layer)), source)
        data = _merge(data, raw) if data else raw
    cfg = config_from_dict(FidelityConfig, data, source=source)
    return apply_overrides(cfg, overrides)

