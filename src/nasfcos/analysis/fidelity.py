"""The proxy-fidelity study (``nasfcos fidelity``): does the cheap proxy rank decoders the way full training does?

NAS-FCOS searches thousands of decoders by training each briefly on cached backbone features and rewarding it
with minus its meta-val loss (the *proxy*). That only works if the proxy orders decoders as full training would.
This module measures it on a fixed set of decoders (:mod:`nasfcos.analysis.fidelity_config` says which):

1. **seed-spread**: a few decoders fully trained with several seeds (how noisy is one reference number?);
2. **proxy**: every decoder scored by every proxy setting (:func:`nasfcos.search.proxy.evaluate_candidate`,
   early stopping off, the search's own candidate seed);
3. **reference**: every decoder fully trained once (:func:`nasfcos.train.trainer.train`: the whole detector on the
   search backbone, COCO AP of the validation split by pycocotools);
4. **report**: Kendall tau / Spearman rho of each proxy against the reference AP with bootstrap intervals, top-k
   overlap, seconds per candidate, the seed spread next to the spread across decoders, one scatter panel per
   setting (:mod:`nasfcos.analysis.fidelity_report`).

**Units and resume.** Every training and every proxy score is one *unit*, recorded atomically as its own JSON file
``units/<stage kind>/.../<name>.json`` when it finishes, with a fingerprint of everything that decides its result
(data, backbone, settings, genotype, seed; not threads or devices). A rerun skips units whose record has the same
fingerprint and runs the rest, so editing one proxy setting or growing ``decoders.random`` only runs what changed.
A reference training killed half-way resumes from its last checkpoint through the trainer's own ``resume``
(each training's folder ``references/<decoder>-seed<S>-<fingerprint>/`` holds its checkpoints); a finished training
whose record was not yet written is read back from its ``metrics.json`` instead of being trained again.

**Scorers (the documented hook).** Which code produces a reference AP and a proxy score is a :class:`Scorers`
object: :class:`TrainingScorers` (the default) trains for real; tests and experiments pass their own to
:func:`run_fidelity` (``scorers=``), or name a factory ``module:callable`` in the environment variable
:data:`SCORERS_ENV` for the ``nasfcos fidelity`` command. Everything else — decoders, units, fingerprints,
resume, progress, the report — is the same code either way.

Failures: a proxy failure is whatever :func:`evaluate_candidate` reports (``status="failed"``, recorded, left out of
the rank statistics and counted). A reference training that diverges (the trainer's "training diverged" error) is
recorded as failed; any other error stops the study with finished units kept. ``retry_failed`` reruns failed units.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from nasfcos.analysis.fidelity_config import (
    CacheSettings,
    FidelityConfig,
    ProxySetting,
    random_name,
)
from nasfcos.config import config_to_dict, dump_config
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, file_sha256, read_json

__all__ = [
    "CONFIG_FILE",
    "SCORERS_ENV",
    "STAGES",
    "Scorers",
    "StudyContext",
    "StudyDecoder",
    "StudySummary",
    "TrainingScorers",
    "Unit",
    "load_scorers",
    "plan_units",
    "read_records",
    "run_fidelity",
    "study_decoders",
]

#: The study's resolved settings in its run folder (also what marks a folder as a fidelity run).
CONFIG_FILE = "fidelity.yaml"
#: The decoders of the study, with their genotypes.
DECODERS_FILE = "decoders.json"
UNITS_DIR = "units"
#: Stages in the order they run.
STAGES = ("seed-spread", "proxy", "reference")
#: Environment variable naming a :class:`Scorers` factory ``module:callable`` for the command (tests, experiments).
SCORERS_ENV = "NASFCOS_FIDELITY_SCORERS"

_DIVERGED = "training diverged"  # the trainer's message for a non-finite loss
#: ProxyConfig keys that change how fast a score is computed, not the score (left out of fingerprints).
_PROXY_SPEED_KEYS = frozenset({"device", "threads", "preload", "preload_max_gb", "channels_last", "failure_reward",
                               "early_stop", "early_stop_epoch", "early_stop_margin", "early_stop_min_samples",
                               "early_stop_decay"})


# --------------------------------------------------------------------------------------------------------------
# Decoders and units
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyDecoder:
    """One decoder of the study: its name (a preset name or ``random-NN``), kind and genotype."""

    name: str
    kind: str  # "preset" or "random"
    genotype_json: str
    key: str

    @property
    def genotype(self) -> Any:
        from nasfcos.space.genotype import Genotype

        return Genotype.from_json(self.genotype_json)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "key": self.key, "genotype": json.loads(self.genotype_json)}


def study_decoders(cfg: FidelityConfig) -> list[StudyDecoder]:
    """The presets, then ``decoders.random`` distinct random samples of the space (``random.Random(seed)``;
    a sample equal to a preset or an earlier sample is skipped), so a larger ``random`` keeps the first ones."""
    from nasfcos.search.config import build_search_space
    from nasfcos.space.presets import resolve_arch

    out: list[StudyDecoder] = []
    seen: set[str] = set()
    for name in cfg.decoders.presets:
        try:
            genotype = resolve_arch(name)
        except UserError as exc:
            raise UserError(f"decoders.presets: {exc}") from None
        out.append(StudyDecoder(name, "preset", genotype.to_json(indent=None), genotype.key()))
        seen.add(genotype.key())
    space = build_search_space(cfg.decoders.space)
    rng = random.Random(cfg.decoders.seed)
    attempts = 0
    while len(out) < len(cfg.decoders.presets) + cfg.decoders.random:
        attempts += 1
        if attempts > 1000 * max(1, cfg.decoders.random):
            raise UserError(f"decoders.random: the space has fewer than {cfg.decoders.random} distinct decoders "
                            "besides the presets")
        genotype = space.sample(rng)
        if genotype.key() in seen:
            continue
        seen.add(genotype.key())
        index = len(out) - len(cfg.decoders.presets) + 1
        out.append(StudyDecoder(random_name(index), "random", genotype.to_json(indent=None), genotype.key()))
    return out


@dataclass(frozen=True)
class Unit:
    """One finished-or-not piece of work: a reference training (``setting is None``) or a proxy score."""

    stage: str  # one of STAGES
    decoder: StudyDecoder
    seed: int
    fingerprint: str
    setting: ProxySetting | None = None

    @property
    def kind(self) -> str:
        return "proxy" if self.setting is not None else "reference"

    @property
    def id(self) -> str:
        """``reference/<decoder>/seed-<S>`` or ``proxy/<setting>/<decoder>`` (also its record's path)."""
        if self.setting is not None:
            return f"proxy/{self.setting.name}/{self.decoder.name}"
        return f"reference/{self.decoder.name}/seed-{self.seed}"

    def record_path(self, run_dir: Path) -> Path:
        return run_dir / UNITS_DIR / f"{self.id}.json"

    def work_dir(self, run_dir: Path) -> Path:
        """A reference training's run folder (named by its fingerprint: stale checkpoints are never resumed)."""
        return run_dir / "references" / f"{self.decoder.name}-seed{self.seed}-{self.fingerprint[:10]}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def backbone_identity(cfg: FidelityConfig) -> dict[str, Any]:
    """What decides the search backbone: the weights file's digest, or how it is trained (and on what data)."""
    if cfg.backbone.weights is not None:
        path = Path(cfg.backbone.weights)
        if not path.is_file():
            raise UserError(f"backbone.weights: {path}: file not found; expected a backbone state dict "
                            "(e.g. a demo run's backbone/backbone.pt) or null to train one")
        return {"name": cfg.backbone.name, "weights_sha256": file_sha256(path)}
    return {"train": config_to_dict(cfg.backbone), "data": config_to_dict(cfg.data)}


def proxy_seed(setting: ProxySetting, decoder: StudyDecoder) -> int:
    """The candidate seed a search with ``setting.seed`` would give this genotype (same proxy run)."""
    from nasfcos.search.loop import candidate_seed

    return int(candidate_seed(setting.seed, decoder.key))


def _proxy_identity(setting: ProxySetting) -> dict[str, Any]:
    proxy = {k: v for k, v in config_to_dict(setting.proxy).items() if k not in _PROXY_SPEED_KEYS}
    return {"cache": config_to_dict(setting.cache), "proxy": proxy}


def _reference_identity(cfg: FidelityConfig) -> dict[str, Any]:
    reference = config_to_dict(cfg.reference)
    reference.pop("checkpoint_period")
    reference.pop("seeds")  # each unit carries its own seed: adding seeds keeps the finished units
    return reference


def plan_units(cfg: FidelityConfig, decoders: Sequence[StudyDecoder], backbone_id: Mapping[str, Any]) -> list[Unit]:
    """Every unit of the study in run order (seed-spread, proxy, reference); a unit appears once, in the first
    stage that needs it (a seed-spread run with a seed of ``reference.seeds`` is also that decoder's reference)."""
    by_name = {d.name: d for d in decoders}
    data = config_to_dict(cfg.data)
    reference = _reference_identity(cfg)

    def reference_unit(stage: str, decoder: StudyDecoder, seed: int) -> Unit:
        fp = _digest({"kind": "reference", "data": data, "backbone": backbone_id, "reference": reference,
                      "genotype": decoder.key, "seed": seed})
        return Unit(stage, decoder, seed, fp)

    units: list[Unit] = []
    seen: set[str] = set()

    def add(unit: Unit) -> None:
        if unit.id not in seen:
            seen.add(unit.id)
            units.append(unit)

    for name in cfg.seed_spread.decoders:
        for seed in cfg.seed_spread.seeds:
            add(reference_unit("seed-spread", by_name[name], seed))
    for setting in cfg.proxies:
        identity = _proxy_identity(setting)
        for decoder in decoders:
            seed = proxy_seed(setting, decoder)
            fp = _digest({"kind": "proxy", "data": data, "backbone": backbone_id, **identity,
                          "genotype": decoder.key, "seed": seed})
            add(Unit("proxy", decoder, seed, fp, setting))
    for seed in cfg.reference.seeds:  # seed-major: a study cut short has every decoder at its first seeds
        for decoder in decoders:
            add(reference_unit("reference", decoder, seed))
    return units


def read_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every unit record of a study folder, by unit id (unreadable files are skipped: a rerun redoes them)."""
    root = Path(run_dir) / UNITS_DIR
    records: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return records
    for path in sorted(root.rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("unit"), str):
            records[record["unit"]] = record
    return records


# --------------------------------------------------------------------------------------------------------------
# Scorers: the hook
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StudyContext:
    """What a scorer may use: the run folder, the settings, a ``say`` for progress lines and ``verbose``."""

    run_dir: Path
    cfg: FidelityConfig
    say: Callable[[str], None] = print
    verbose: bool = False


class Scorers(Protocol):
    """Produces the two kinds of numbers the study compares.

    ``reference(unit, ctx)`` fully trains ``unit.decoder`` with seed ``unit.seed`` and returns the validation
    metrics, a mapping with at least ``"AP"`` (COCO AP in [0, 1]). ``proxy(unit, ctx)`` scores ``unit.decoder``
    with ``unit.setting`` and returns an :class:`~nasfcos.search.results.EvaluationResult` (or anything
    :func:`~nasfcos.search.results.as_result` accepts). Both may raise ``KeyboardInterrupt``: nothing is recorded
    for that unit. The study times each call itself.
    """

    def reference(self, unit: Unit, ctx: StudyContext) -> Mapping[str, Any]: ...

    def proxy(self, unit: Unit, ctx: StudyContext) -> Any: ...


def load_scorers(spec: str, ctx: StudyContext) -> Scorers:
    """The scorers named by ``module:callable`` (:data:`SCORERS_ENV`); the callable receives the context."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{SCORERS_ENV}={spec}: expected module:callable")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{SCORERS_ENV}={spec}: cannot load it ({exc})") from None
    return factory(ctx)


def _export_backbone(detector_weights: Path, out_path: Path) -> Path:
    """The ``backbone.*`` tensors of a trained detector as a plain backbone state dict (``model.pretrained``)."""
    from nasfcos.io import atomic_torch_save, safe_torch_load

    blob = safe_torch_load(detector_weights, "detector weights")
    state = {k[len("backbone."):]: v for k, v in blob["model"].items() if k.startswith("backbone.")}
    return atomic_torch_save(out_path, state)


def _train_overrides(cfg: FidelityConfig, data_dir: Path, *, arch: str, width: int, iters: int, batch_size: int,
                     base_lr: float, freeze_at: int, frozen_bn: bool, seed: int, checkpoint_period: int,
                     grad_clip_norm: float | None, pretrained: Path | None) -> list[str]:
    size = cfg.data.image_size
    overrides = [
        f"model.arch={arch}",
        f"model.backbone={cfg.backbone.name}",
        f"model.fpn_width={width}",
        f"model.head_width={width}",
        "model.concat=grouped",
        f"model.freeze_at={freeze_at}",
        f"model.frozen_bn={str(frozen_bn).lower()}",
        "data.format=synthetic",
        f"data.train_path={data_dir}",
        f"data.min_size={size}",
        f"data.test_min_size={size}",
        f"data.max_size={size}",
        f"solver.batch_size={batch_size}",
        f"solver.base_lr={base_lr}",
        f"solver.warmup_iters={min(50, iters // 5)}",
        f"solver.max_iter={iters}",
        f"solver.steps=[{max(1, int(iters * 0.75))},{max(1, int(iters * 0.9))}]",
        f"solver.grad_clip_norm={'null' if grad_clip_norm is None else grad_clip_norm}",
        "solver.channels_last=false",
        f"runtime.seed={seed}",
        f"runtime.threads={cfg.threads}",
        "runtime.num_workers=0",
        f"runtime.checkpoint_period={checkpoint_period}",
        "runtime.keep_checkpoints=1",
        "runtime.log_period=10",
        "runtime.tensorboard=false",
    ]
    if pretrained is not None:
        overrides.append(f"model.pretrained={pretrained}")
    return overrides


def _train_or_resume(train_cfg: Any, run_dir: Path, quiet: bool) -> dict[str, Any]:
    """Metrics of a training run: read back when it finished, resumed when it has a checkpoint, else trained."""
    from nasfcos.train.checkpoint import latest_checkpoint
    from nasfcos.train.trainer import FINAL_WEIGHTS, train

    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and (run_dir / FINAL_WEIGHTS).is_file():
        return dict(read_json(metrics_file, "training metrics"))
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    result = train(train_cfg, run_dir, resume=resume, quiet=quiet)
    return dict(result.metrics or {})


class TrainingScorers:
    """The real scorers: full training with :func:`nasfcos.train.trainer.train` and the search's proxy task
    :func:`nasfcos.search.proxy.evaluate_candidate`. The shared inputs — the synthetic set, the search backbone,
    one feature cache per distinct :class:`CacheSettings` — are made on first use, each reused when already there
    (the synthetic set and the caches check their own manifests; the backbone by its fingerprinted folder)."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx
        self._data: Any = None
        self._backbone: Path | None = None
        self._caches: dict[str, Path] = {}

    # shared inputs ------------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.ctx.run_dir / "data" / "synth"

    def data(self) -> Any:
        """The synthetic set (:class:`~nasfcos.data.synthetic.SynthInfo`), made once."""
        if self._data is None:
            from nasfcos.data.synthetic import ensure_synthetic

            d = self.ctx.cfg.data
            t0 = time.perf_counter()
            self._data = ensure_synthetic(self.data_dir, seed=d.seed, num_train=d.num_train, num_val=d.num_val,
                                          image_size=d.image_size, num_classes=d.num_classes)
            if not self._data.reused:
                self.ctx.say(f"  data: {d.num_train} train + {d.num_val} val synthetic images at {d.image_size} px "
                             f"({time.perf_counter() - t0:.0f} s)")
        return self._data

    def backbone(self) -> Path:
        """The search backbone's state dict: ``backbone.weights``, or trained here once (resumable)."""
        if self._backbone is not None:
            return self._backbone
        cfg = self.ctx.cfg
        if cfg.backbone.weights is not None:
            self._backbone = Path(cfg.backbone.weights)
            return self._backbone
        from nasfcos.config import TrainConfig, load_config

        self.data()
        folder = self.ctx.run_dir / "backbone" / _digest(backbone_identity(cfg))[:10]
        out = folder / "backbone.pt"
        if not out.is_file():
            b = cfg.backbone
            self.ctx.say(f"  backbone: training {b.name} + fpn-fcos for {b.iters} iterations (the search backbone)")
            t0 = time.perf_counter()
            overrides = _train_overrides(cfg, self.data_dir, arch="fpn-fcos", width=b.width, iters=b.iters,
                                         batch_size=b.batch_size, base_lr=b.base_lr, freeze_at=0, frozen_bn=False,
                                         seed=cfg.data.seed, checkpoint_period=max(50, b.iters // 4),
                                         grad_clip_norm=35.0, pretrained=None)
            metrics = _train_or_resume(load_config(TrainConfig, None, overrides), folder, not self.ctx.verbose)
            _export_backbone(folder / "model_final.pt", out)
            self.ctx.say(f"  backbone: val AP {metrics.get('AP', float('nan')):.3f} "
                         f"({time.perf_counter() - t0:.0f} s)")
        self._backbone = out
        return out

    def cache(self, settings: CacheSettings, fcos: str) -> Path:
        """The feature cache of ``settings`` (built once per distinct settings and FCOS target kind)."""
        tag = f"crop{settings.crop}-n{settings.images or 'all'}-{fcos}"
        if tag in self._caches:
            return self._caches[tag]
        from nasfcos.data.cache import build_cache
        from nasfcos.data.coco import read_coco
        from nasfcos.data.records import DetectionSet

        info = self.data()
        weights = self.backbone()
        cfg = self.ctx.cfg
        train_set = read_coco(info.json_for("train"), info.train_images)
        if settings.images is not None:
            if settings.images > len(train_set):
                raise UserError(f"proxies: cache.images: {settings.images} is more than the "
                                f"{len(train_set)} training images (data.num_train)")
            train_set = DetectionSet(train_set.records[:settings.images], train_set.class_names,
                                     train_set.category_ids, train_set.source)
        folder = self.ctx.run_dir / "caches" / f"{tag}-{_digest(backbone_identity(cfg))[:10]}"
        t0 = time.perf_counter()
        cache = build_cache(train_set, folder, backbone=cfg.backbone.name, weights=weights, crop=settings.crop,
                            meta_train=settings.meta_train, seed=cfg.data.seed, batch_size=16, device="cpu",
                            threads=cfg.threads, fcos=fcos, progress=False)
        if not cache.reused:
            self.ctx.say(f"  cache {tag}: {len(train_set)} crops cached ({time.perf_counter() - t0:.0f} s)")
        self._caches[tag] = folder
        return folder

    def genotype_file(self, decoder: StudyDecoder) -> Path:
        path = self.ctx.run_dir / "genotypes" / f"{decoder.name}-{decoder.key[:10]}.json"
        if not path.is_file():
            from nasfcos.io import atomic_write_text

            atomic_write_text(path, decoder.genotype.to_json())
        return path

    # the two scorers ----------------------------------------------------------------------------------------
    def reference(self, unit: Unit, ctx: StudyContext) -> Mapping[str, Any]:
        from nasfcos.config import TrainConfig, load_config

        cfg = ctx.cfg
        r = cfg.reference
        self.data()
        overrides = _train_overrides(cfg, self.data_dir, arch=str(self.genotype_file(unit.decoder)), width=r.width,
                                     iters=r.iters, batch_size=r.batch_size, base_lr=r.base_lr,
                                     freeze_at=r.freeze_at, frozen_bn=True, seed=unit.seed,
                                     checkpoint_period=r.checkpoint_period, grad_clip_norm=r.grad_clip_norm,
                                     pretrained=self.backbone())
        run_dir = unit.work_dir(ctx.run_dir)
        metrics = _train_or_resume(load_config(TrainConfig, None, overrides), run_dir, not ctx.verbose)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # finished: model_final.pt is what is kept
        return metrics

    def proxy(self, unit: Unit, ctx: StudyContext) -> Any:
        from nasfcos.search.proxy import evaluate_candidate

        assert unit.setting is not None
        proxy_cfg = replace(unit.setting.proxy, early_stop=False)
        cache = self.cache(unit.setting.cache, proxy_cfg.fcos)
        return evaluate_candidate(unit.decoder.genotype, cache, proxy_cfg, seed=unit.seed)


# --------------------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StudySummary:
    """What one invocation did: units run now / already finished / still to run, and where the report is."""

    run_dir: Path
    ran: list[str] = field(default_factory=list)
    reused: int = 0
    remaining: int = 0
    seconds: float = 0.0
    report: Path | None = None


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _record(unit: Unit, status: str, seconds: float, result: Mapping[str, Any], error: str | None = None
            ) -> dict[str, Any]:
    return {
        "unit": unit.id, "stage": unit.stage, "kind": unit.kind, "decoder": unit.decoder.name,
        "key": unit.decoder.key, "seed": unit.seed, "setting": unit.setting.name if unit.setting else None,
        "fingerprint": unit.fingerprint, "status": status, "error": error, "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": dict(result),
    }


def _run_unit(unit: Unit, scorers: Scorers, ctx: StudyContext) -> dict[str, Any]:
    from nasfcos.search.results import as_result

    start = time.perf_counter()
    if unit.kind == "proxy":
        outcome = as_result(scorers.proxy(unit, ctx))
        seconds = time.perf_counter() - start
        result = outcome.to_dict()
        return _record(unit, "ok" if outcome.status == "ok" else "failed", seconds, result, outcome.error)
    try:
        metrics = dict(scorers.reference(unit, ctx))
    except UserError as exc:
        if _DIVERGED not in str(exc):
            raise
        return _record(unit, "failed", time.perf_counter() - start, {}, str(exc).splitlines()[0])
    seconds = time.perf_counter() - start
    ap = metrics.get("AP")
    if not isinstance(ap, (int, float)) or not math.isfinite(float(ap)):
        return _record(unit, "failed", seconds, metrics, f"no finite AP in the validation metrics ({ap!r})")
    return _record(unit, "ok", seconds, metrics)


def _describe(record: Mapping[str, Any]) -> str:
    result = record.get("result") or {}
    if record["status"] != "ok":
        return f"failed ({record.get('error')})"
    if record["kind"] == "reference":
        return f"AP {100 * float(result['AP']):.2f}"
    text = f"reward {float(result['reward']):.4f}"
    if result.get("ap") is not None:
        text += f", AP {100 * float(result['ap']):.2f}"
    return text


def save_study_files(run_dir: Path, cfg: FidelityConfig, decoders: Sequence[StudyDecoder]) -> None:
    """``fidelity.yaml`` and ``decoders.json`` (rewritten on every run: the current settings)."""
    dump_config(cfg, run_dir / CONFIG_FILE)
    atomic_write_json(run_dir / DECODERS_FILE, [d.to_dict() for d in decoders])


def run_fidelity(
    run_dir: str | Path,
    cfg: FidelityConfig,
    *,
    scorers: Scorers | Callable[[StudyContext], Scorers] | None = None,
    stages: Sequence[str] = STAGES,
    max_units: int | None = None,
    retry_failed: bool = False,
    report: bool = True,
    say: Callable[[str], None] = print,
    verbose: bool = False,
) -> StudySummary:
    """Run (or continue) the study in ``run_dir``: every unfinished unit of ``stages``, at most ``max_units`` of
    them, then the report (``report.md``, ``fidelity.json``, the scatter plot) of everything finished so far.

    ``scorers``: a :class:`Scorers` or a factory taking the :class:`StudyContext` (default
    :class:`TrainingScorers`). Progress lines (stage, i/n, seconds, ETA of the stage) go to ``say``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage {unknown[0]!r}; expected some of {', '.join(STAGES)}")
    if max_units is not None and max_units < 0:
        raise UserError(f"--max-units: expected 0 or more (got {max_units})")
    run_dir = Path(run_dir)
    started = time.perf_counter()
    decoders = study_decoders(cfg)
    units = plan_units(cfg, decoders, backbone_identity(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(run_dir):
        return _run_locked(run_dir, cfg, decoders, units, scorers, stages, max_units, retry_failed, report, say,
                           verbose, started)


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN/.lock`` so that two processes never run the same study's units at once (POSIX ``flock``; the
    lock goes with the process, so a killed run never leaves a stale one)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no protection, as before
        yield
        return
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{run_dir}: another `nasfcos fidelity` is running in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_locked(run_dir: Path, cfg: FidelityConfig, decoders: list[StudyDecoder], units: list[Unit],
                scorers: Any, stages: Sequence[str], max_units: int | None, retry_failed: bool, report: bool,
                say: Callable[[str], None], verbose: bool, started: float) -> StudySummary:
    save_study_files(run_dir, cfg, decoders)
    ctx = StudyContext(run_dir, cfg, say, verbose)
    if scorers is None:
        scorers = TrainingScorers(ctx)
    elif isinstance(scorers, type) or not (hasattr(scorers, "reference") and hasattr(scorers, "proxy")):
        scorers = scorers(ctx)  # a factory (or a Scorers class) taking the context

    records = read_records(run_dir)

    def finished(unit: Unit) -> bool:
        record = records.get(unit.id)
        if record is None or record.get("fingerprint") != unit.fingerprint:
            return False
        return not (retry_failed and record.get("status") != "ok")

    summary = StudySummary(run_dir)
    todo = [u for u in units if u.stage in stages and not finished(u)]
    summary.reused = sum(1 for u in units if finished(u))
    stale = sum(1 for u in units if u.id in records and records[u.id].get("fingerprint") != u.fingerprint)
    say(f"fidelity study: {len(decoders)} decoders, {len(cfg.proxies)} proxy settings, {len(units)} units "
        f"({summary.reused} finished earlier{f', {stale} with changed settings' if stale else ''}, "
        f"{len(todo)} to run in stages {', '.join(s for s in STAGES if s in stages)})")
    budget = len(todo) if max_units is None else min(max_units, len(todo))
    try:
        for stage in STAGES:
            stage_units = [u for u in units if u.stage == stage]
            stage_todo = [u for u in todo if u.stage == stage]
            if stage not in stages or not stage_todo:
                continue
            if len(summary.ran) >= budget:
                break
            done_before = len(stage_units) - len(stage_todo)
            past = [float(records[u.id]["seconds"]) for u in stage_units
                    if u.id in records and finished(u) and records[u.id].get("seconds") is not None]
            say(f"[{stage}] {len(stage_todo)} of {len(stage_units)} units to run")
            now: list[float] = []
            for i, unit in enumerate(stage_todo, start=1):
                if len(summary.ran) >= budget:
                    break
                if unit.kind == "reference":  # minutes long: say what is running
                    say(f"[{stage} {done_before + i}/{len(stage_units)}] {unit.id}: training "
                        f"{cfg.reference.iters} iterations ...")
                record = _run_unit(unit, scorers, ctx)
                atomic_write_json(unit.record_path(run_dir), record)
                records[unit.id] = record
                summary.ran.append(unit.id)
                now.append(float(record["seconds"]))
                per_unit = sum(now) / len(now) if now else (sum(past) / len(past) if past else math.nan)
                left = len(stage_todo) - i
                say(f"[{stage} {done_before + i}/{len(stage_units)}] {unit.id}: {_describe(record)} "
                    f"in {record['seconds']:.1f} s; stage ETA {_fmt_duration(left * per_unit)}")
    finally:
        summary.remaining = sum(1 for u in units if not finished(u))
        summary.seconds = time.perf_counter() - started
    if report:
        from nasfcos.analysis.fidelity_report import write_fidelity_report

        summary.report = write_fidelity_report(run_dir)
    return summary


def load_study(run_dir: str | Path) -> tuple[FidelityConfig, list[StudyDecoder], list[Unit], dict[str, dict[str, Any]]]:
    """The saved settings, decoders, planned units and unit records of a study folder (for the report)."""
    from nasfcos.analysis.fidelity_config import load_fidelity_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a fidelity study folder (no {CONFIG_FILE})")
    cfg = load_fidelity_config(base=run_dir / CONFIG_FILE)
    raw = read_json(run_dir / DECODERS_FILE, "study decoders") if (run_dir / DECODERS_FILE).is_file() else None
    decoders = ([StudyDecoder(d["name"], d["kind"], json.dumps(d["genotype"]), d["key"]) for d in raw]
                if raw is not None else study_decoders(cfg))
    try:
        backbone_id = backbone_identity(cfg)
    except UserError:
        backbone_id = {"missing": cfg.backbone.weights}
    records = read_records(run_dir)
    return cfg, decoders, plan_units(cfg, decoders, backbone_id), records

