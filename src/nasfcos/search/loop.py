"""The architecture search loop (NAS-FCOS Sec. 3.3): propose, evaluate in parallel, learn, checkpoint, repeat.

One iteration ("batch", one policy update)::

    proposals = strategy.propose(batch_size)              # same RNG state => same proposals
    known genotypes (by Genotype.key())  -> their stored reward is reused, nothing is trained again
    new genotypes (at most the remaining budget) -> executor.map_candidates(...)
        each result is stored the moment it completes    # its own SQLite transaction
    strategy.observe(all rewarded proposals, in proposal order)
    store.commit_step(state=strategy + loop state)         # one transaction

until the store holds ``budget`` distinct evaluations. Re-proposals of known genotypes do not count toward the
budget (it counts *distinct* evaluations) but the controller still learns from them; ``max_proposals_factor``
bounds the loop when a converged controller keeps re-proposing what it already knows.

**Resume protocol (kill-safe at any moment).** The store's meta holds the strategy state (controller,
optimiser, baseline, PPO buffer, RNG) and the loop state (update step, proposal count, early-stop reference)
as of the last completed batch; every stored result carries ``controller_step`` = the update step of the
batch that produced it. On ``resume=True`` the loop restores both, re-proposes the interrupted batch (the
restored RNG gives exactly the same proposals), takes the results of that batch that are already in the store
(``controller_step`` equal to the current step) and evaluates only the others. Nothing is lost or evaluated
twice, the total is exactly ``budget``, and with a deterministic evaluator the genotypes, rewards and final
search state equal those of an uninterrupted run with the same seed (with the inline executor the store's
order is the proposal order; parallel executors store a batch in completion order). A kill during the policy update or the commit just redoes
the update from the same inputs. The resolved config (``config.yaml``) must match on resume except for the
keys in :data:`RESUMABLE_KEYS` (budget, executor and resources), which only change how much or where.

**Failures.** A candidate that fails (exception, NaN, a dead worker after its retries) is stored with
``status="failed"``, its error text and a penalty reward, and the search goes on. The penalty is
``search.failure_reward`` if set, else ``ProxyConfig.failure_reward`` if set; otherwise the worst non-failed
reward of the *earlier* batches minus ``search.failure_margin`` (committed results only, so it does not depend
on the completion order inside a batch and is the same after a resume), and ``search.initial_failure_reward``
while no earlier batch has a reward (pick a value below any plausible reward: the default -10 suits the
``-loss`` reward; use e.g. -0.1 with ``reward: ap``).

**Early stopping of hopeless candidates.** With ``ProxyConfig.early_stop`` the loop keeps the proxy's
:class:`~nasfcos.search.proxy.EarlyStopReference` (a running average of candidates' early-epoch validation
loss). Every candidate of a batch gets the reference committed with the previous batch; when the batch is
complete the new candidates' ``early_stop_loss`` values are folded in, in proposal order, and the result is
committed with the strategy state. Each candidate's ``early_stop_loss`` is stored in the same transaction as
its result (meta ``early_stop_loss/<key>``), so a resumed batch folds in exactly the same values.

Outputs in the run folder: ``config.yaml``, ``store.sqlite``, ``log.jsonl`` and ``tensorboard/``
(``candidate/*`` per evaluation, ``update/*`` per policy update), ``topk/rankNN.json`` (genotype JSON, loadable
by ``nasfcos train --arch``) with ``topk/topk.json`` (rewards, losses, GMACs, params), rewritten atomically
after every batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from nasfcos.config import _require, config_from_dict, config_to_dict, dump_config
from nasfcos.errors import UserError
from nasfcos.io import atomic_write_json, atomic_write_text
from nasfcos.search.executors import Executor, InlineExecutor, build_executor
from nasfcos.search.runner import (
    DEFAULT_EVALUATOR,
    CandidateOutcome,
    CandidateTask,
    evaluator_spec,
    module_root,
    resolve_evaluator,
)
from nasfcos.search.store import CandidateResult, ResultStore

__all__ = [
    "CONFIG_FILE",
    "LOOP_STATE_KEY",
    "RESUMABLE_KEYS",
    "STORE_FILE",
    "ControllerConfig",
    "PPOConfig",
    "SearchConfig",
    "SearchSummary",
    "SpaceConfig",
    "build_search_space",
    "candidate_seed",
    "load_search_run_config",
    "run_search",
    "search_run_config_class",
    "write_topk",
]

CONFIG_FILE = "config.yaml"
STORE_FILE = "store.sqlite"
TOPK_DIR = "topk"
#: store meta key of the loop's own state (JSON), committed together with the strategy state.
LOOP_STATE_KEY = "loop_state"

#: Config keys that may change when a run is resumed (they do not change which genotypes are evaluated or
#: their rewards): a larger budget continues the search, and the run may move to other hardware.
RESUMABLE_KEYS = frozenset({
    "cache",
    "search.budget",
    "search.executor",
    "search.workers",
    "search.worker_threads",
    "search.ray_address",
    "search.ray_num_cpus_per_task",
    "search.ray_num_gpus_per_task",
    "search.max_retries",
    "search.max_proposals_factor",
    "search.top_k",
    "search.tensorboard",
    "proxy.device",
    "proxy.threads",
})


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceConfig:
    """The search space (:class:`~nasfcos.space.SearchSpace`); ``None`` op sets mean "all of them".

    ``fixed_fpn`` / ``fixed_head``: a preset name or genotype JSON file whose FPN / head is held fixed while
    the other part is searched (e.g. ``fixed_head: fpn-fcos`` searches the FPN only).
    """

    head: Literal["sequential", "cell"] = "sequential"
    num_fpn_cells: int = 7
    num_head_cells: int = 5
    num_head_layers: int = 6
    fpn_ops: Optional[tuple[str, ...]] = None
    aggregations: Optional[tuple[str, ...]] = None
    head_ops: Optional[tuple[str, ...]] = None
    per_level_share: Optional[bool] = None
    fixed_fpn: Optional[str] = None
    fixed_head: Optional[str] = None


@dataclass(frozen=True)
class ControllerConfig:
    """The LSTM policy (FACTS 5: 2 layers, hidden 100)."""

    hidden_size: int = 100
    num_layers: int = 2
    embedding_size: Optional[int] = None
    temperature: float = 1.0
    tanh_constant: Optional[float] = None

    def __post_init__(self) -> None:
        _require(self.hidden_size >= 1, "hidden_size", self.hidden_size, ">= 1")
        _require(self.num_layers >= 1, "num_layers", self.num_layers, ">= 1")
        _require(self.temperature > 0, "temperature", self.temperature, "> 0")


@dataclass(frozen=True)
class PPOConfig:
    """PPO (FACTS 5: Adam 1e-4, clip 0.1, grad-norm clip 2.0, baseline decay 0.95, no entropy bonus,
    a buffer of the last 100 samples)."""

    lr: float = 1e-4
    clip: float = 0.1
    grad_clip: Optional[float] = 2.0
    baseline_decay: float = 0.95
    entropy_weight: float = 0.0
    epochs: int = 4
    buffer_size: int = 100
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(0 < self.clip < 1, "clip", self.clip, "in (0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or null")
        _require(0 <= self.baseline_decay < 1, "baseline_decay", self.baseline_decay, "in [0, 1)")
        _require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _require(self.buffer_size >= 1, "buffer_size", self.buffer_size, ">= 1")


@dataclass(frozen=True)
class SearchConfig:
    """How the search runs. Defaults are the paper's (about 2,800 architectures, an update after each one,
    top 20 kept for full training); ``configs/search-*.yaml`` hold CPU-demo and cluster presets.

    ``budget``: distinct evaluations to reach. ``batch_size``: candidates proposed per policy update (and so
    evaluated in parallel). ``workers``: processes (``process``) or CPUs of a local Ray instance (``ray``;
    ``None`` there = all). ``worker_threads``: torch threads per worker (``None``: cores / workers for
    processes, ``ray_num_cpus_per_task`` for Ray). ``max_retries``: retries of a candidate whose worker died.
    ``max_proposals_factor``: stop after ``factor x budget`` proposals even if the budget is not reached.
    """

    budget: int = 2800
    batch_size: int = 1
    strategy: Literal["ppo", "random"] = "ppo"
    seed: int = 0
    executor: Literal["inline", "process", "ray"] = "inline"
    workers: Optional[int] = None
    worker_threads: Optional[int] = None
    ray_address: Optional[str] = None
    ray_num_cpus_per_task: float = 1.0
    ray_num_gpus_per_task: float = 0.0
    max_retries: int = 2
    max_proposals_factor: float = 10.0
    top_k: int = 20
    failure_reward: Optional[float] = None
    failure_margin: float = 1.0
    initial_failure_reward: float = -10.0
    tensorboard: bool = True
    space: SpaceConfig = field(default_factory=SpaceConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        _require(self.budget >= 1, "budget", self.budget, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.workers is None or self.workers >= 1, "workers", self.workers, ">= 1 or null")
        _require(self.worker_threads is None or self.worker_threads >= 1, "worker_threads", self.worker_threads,
                 ">= 1 or null")
        _require(self.ray_num_cpus_per_task >= 0, "ray_num_cpus_per_task", self.ray_num_cpus_per_task, ">= 0")
        _require(self.ray_num_gpus_per_task >= 0, "ray_num_gpus_per_task", self.ray_num_gpus_per_task, ">= 0")
        _require(self.max_retries >= 0, "max_retries", self.max_retries, ">= 0")
        _require(self.max_proposals_factor >= 1, "max_proposals_factor", self.max_proposals_factor, ">= 1")
        _require(self.top_k >= 1, "top_k", self.top_k, ">= 1")
        _require(self.failure_reward is None or math.isfinite(self.failure_reward), "failure_reward",
                 self.failure_reward, "a finite number or null")
        _require(self.failure_margin >= 0, "failure_margin", self.failure_margin, ">= 0")
        _require(math.isfinite(self.initial_failure_reward), "initial_failure_reward", self.initial_failure_reward,
                 "a finite number")


@lru_cache(maxsize=None)
def search_run_config_class() -> type:
    """``SearchRunConfig(cache, search: SearchConfig, proxy: ProxyConfig)`` — the layout of ``config.yaml``
    and of ``nasfcos search --config`` files (built on first use: the proxy module is imported lazily)."""
    from nasfcos.search.proxy import ProxyConfig

    cls = dataclasses.make_dataclass(
        "SearchRunConfig",
        [
            ("cache", Optional[str], field(default=None)),
            ("search", SearchConfig, field(default_factory=SearchConfig)),
            ("proxy", ProxyConfig, field(default_factory=ProxyConfig)),
        ],
        frozen=True,
    )
    cls.__module__ = __name__
    return cls


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_search_run_config(
    config: str | Path | None = None,
    proxy_config: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    base: str | Path | None = None,
) -> Any:
    """The resolved ``SearchRunConfig``, later layers winning: defaults <- ``base`` (a run's ``config.yaml``,
    when resuming) <- ``config`` (sections ``cache``, ``search``, ``proxy``) <- ``proxy_config`` (a file of
    ``ProxyConfig`` keys, e.g. ``configs/proxy-paper.yaml``) <- ``overrides`` (``search.budget=100``,
    ``proxy.epochs=5``). Each file only changes the keys it names; mistakes are one-line ``UserError``s
    naming the file and the full key."""
    from nasfcos.config import _read_yaml, apply_overrides

    cls = search_run_config_class()
    cfg = cls()
    for path, section in ((base, None), (config, None), (proxy_config, "proxy")):
        if path is None:
            continue
        data: Mapping[str, Any] = _read_yaml(Path(path))
        if section is not None:
            data = {section: data}
        cfg = config_from_dict(cls, _deep_merge(config_to_dict(cfg), data), source=str(path))
    return apply_overrides(cfg, overrides)


def build_search_space(cfg: SpaceConfig) -> Any:
    """The :class:`~nasfcos.space.SearchSpace` a :class:`SpaceConfig` describes."""
    from nasfcos.space import FPN_OPS, AGGREGATIONS, SearchSpace, resolve_arch

    kwargs: dict[str, Any] = {
        "num_fpn_cells": cfg.num_fpn_cells,
        "num_head_cells": cfg.num_head_cells,
        "head": cfg.head,
        "num_head_layers": cfg.num_head_layers,
        "fpn_ops": cfg.fpn_ops if cfg.fpn_ops is not None else FPN_OPS,
        "aggregations": cfg.aggregations if cfg.aggregations is not None else AGGREGATIONS,
        "head_ops": cfg.head_ops,
        "per_level_share": cfg.per_level_share,
    }
    if cfg.fixed_fpn is not None:
        kwargs["fixed_fpn"] = resolve_arch(cfg.fixed_fpn).fpn
    if cfg.fixed_head is not None:
        kwargs["fixed_head"] = resolve_arch(cfg.fixed_head).head
    return SearchSpace(**kwargs)


def _strategy_settings(cfg: SearchConfig) -> dict[str, Any]:
    if cfg.strategy == "random":
        return {}
    return {**config_to_dict(cfg.controller), **config_to_dict(cfg.ppo)}


def candidate_seed(search_seed: int, key: str) -> int:
    """The training seed of a candidate: a function of the search seed and the genotype only, so a genotype
    gets the same proxy run whatever batch, worker or restart it lands in."""
    digest = hashlib.sha1(f"{int(search_seed)}:{key}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------------------
# Run folder: config and resume checks
# --------------------------------------------------------------------------------------------------------------


def _plain_config(cache_path: str | Path, search_cfg: SearchConfig, proxy_cfg: Any) -> dict[str, Any]:
    proxy = None
    if proxy_cfg is not None:
        if not dataclasses.is_dataclass(proxy_cfg):
            raise TypeError(f"proxy_cfg must be a dataclass instance or None (got {type(proxy_cfg).__name__})")
        proxy = config_to_dict(proxy_cfg)
    return {"cache": str(cache_path), "search": config_to_dict(search_cfg), "proxy": proxy}


def _write_config(path: Path, plain: dict[str, Any], search_cfg: SearchConfig, proxy_cfg: Any) -> None:
    try:
        from nasfcos.search.proxy import ProxyConfig
    except ImportError:  # the proxy module is not available (tests of the loop alone)
        ProxyConfig = None  # type: ignore[assignment,misc]
    if ProxyConfig is not None and isinstance(proxy_cfg, ProxyConfig):
        cls = search_run_config_class()
        dump_config(cls(cache=plain["cache"], search=search_cfg, proxy=proxy_cfg), path)
        return
    import yaml  # a custom evaluator's config (or none): same layout, plain YAML

    atomic_write_text(path, yaml.safe_dump(plain, sort_keys=False, default_flow_style=None))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, tuple):
        data = list(data)
    return {prefix: data}


def _check_resume_config(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Raise :class:`UserError` naming the first key that differs (outside :data:`RESUMABLE_KEYS`); returns
    whether a resumable key changed (the file is then rewritten)."""
    old, new = _flatten(saved), _flatten(current)
    changed = False
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<missing>") == new.get(key, "<missing>"):
            continue
        if key in RESUMABLE_KEYS:
            changed = True
            continue
        raise UserError(
            f"{path}: {key} differs from the run being resumed (run has {old.get(key, '<missing>')!r}, "
            f"now {new.get(key, '<missing>')!r}); resume with the run's own settings or start a new run"
        )
    return changed


def _prepare_run_dir(run_dir: Path, plain: dict[str, Any], search_cfg: SearchConfig, proxy_cfg: Any,
                     resume: bool) -> None:
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise UserError(f"{run_dir}: not a search run folder (no {CONFIG_FILE}); cannot resume it")
        import yaml

        try:
            saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{config_path}: malformed YAML ({str(exc).splitlines()[0]})") from None
        if _check_resume_config(config_path, saved, plain):
            _write_config(config_path, plain, search_cfg, proxy_cfg)
        return
    if config_path.exists() or (run_dir / STORE_FILE).exists():
        raise UserError(f"{run_dir}: already holds a search; continue it with --resume {run_dir} or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(config_path, plain, search_cfg, proxy_cfg)


def _check_cache(cache_path: Path, store: ResultStore, using_proxy: bool, proxy_cfg: Any) -> None:
    """The cache must exist; with the real proxy it must open and have the fingerprint the run started with."""
    if not cache_path.exists():
        raise UserError(f"{cache_path}: feature cache not found (build one with `nasfcos cache`)")
    if not using_proxy:
        return
    from nasfcos.data.cache import FeatureCache

    cache = FeatureCache.open(cache_path)
    mode = getattr(proxy_cfg, "fcos", None)
    if mode is not None:
        cache.target_suffix(mode)  # UserError when the cache lacks the FCOS targets the proxy trains on
    fingerprint = cache.fingerprint
    saved = store.get_meta("cache_fingerprint")
    if saved is None:
        store.set_meta("cache_fingerprint", fingerprint)
    elif saved != fingerprint:
        raise UserError(
            f"{cache_path}: feature cache differs from the one this search started with "
            f"(fingerprint {fingerprint}, run has {saved}); rewards would not be comparable"
        )


# --------------------------------------------------------------------------------------------------------------
# Top-k files
# --------------------------------------------------------------------------------------------------------------


def _result_summary(result: CandidateResult) -> dict[str, Any]:
    return {
        "key": result.key,
        "reward": result.reward,
        "status": result.status,
        "loss_cls": result.loss_cls,
        "loss_reg": result.loss_reg,
        "loss_ctr": result.loss_ctr,
        "loss_sum": result.loss_sum,
        "ap": result.ap,
        "gmacs": result.gmacs,
        "params": result.params,
        "wall_time_s": result.wall_time_s,
        "controller_step": result.controller_step,
        "index": result.id,
    }


def write_topk(folder: str | Path, results: list[CandidateResult]) -> list[Path]:
    """``rank01.json``... (genotype JSON, best first) and ``topk.json`` (their numbers), all atomic; stale
    rank files from a larger earlier list are removed."""
    from nasfcos.space.genotype import Genotype

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(results))))
    paths: list[Path] = []
    entries = []
    for rank, result in enumerate(results, start=1):
        path = folder / f"rank{rank:0{width}d}.json"
        atomic_write_text(path, Genotype.from_json(result.genotype_json).to_json())
        paths.append(path)
        entries.append({"rank": rank, "file": path.name, **_result_summary(result)})
    atomic_write_json(folder / "topk.json", entries)
    keep = {p.name for p in paths}
    for stale in folder.glob("rank*.json"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return paths


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """What the loop commits with the strategy state (JSON in the store's meta)."""

    step: int = 0  # policy updates done = index of the batch being worked on
    proposals: int = 0  # proposals drawn in completed batches
    repeats: int = 0  # proposals whose genotype was already evaluated
    early_stop_reference: Any = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> _LoopState:
        if text is None:
            return cls()
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("step", "proposals", "repeats", "early_stop_reference") if k in data})


@dataclass(frozen=True)
class SearchSummary:
    """What a finished (or stopped) search produced."""

    run_dir: Path
    evaluated: int  # distinct evaluations in the store
    failed: int
    pruned: int
    proposals: int
    repeats: int
    updates: int
    stop_reason: str  # "budget" or "proposal_limit"
    top: tuple[CandidateResult, ...]
    topk_files: tuple[Path, ...]
    wall_time_s: float

    @property
    def best(self) -> CandidateResult | None:
        return self.top[0] if self.top else None


def _store_result(task: CandidateTask, outcome: CandidateOutcome, step: int, penalty: float) -> CandidateResult:
    """The store's record of an outcome; a failed candidate gets ``penalty`` as its reward."""
    failed = outcome.status == "failed"
    reward = penalty if failed else outcome.reward
    assert reward is not None and math.isfinite(reward)
    return CandidateResult(
        key=task.key,
        genotype_json=task.genotype_json,
        actions=task.actions,
        reward=float(reward),
        loss_cls=outcome.loss_cls,
        loss_reg=outcome.loss_reg,
        loss_ctr=outcome.loss_ctr,
        ap=outcome.ap,
        gmacs=outcome.gmacs,
        params=outcome.params,
        wall_time_s=outcome.wall_time_s,
        status="failed" if failed else outcome.status,
        error=(outcome.error or "failed") if failed else outcome.error,
        controller_step=step,
    )


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _resolve_evaluator(evaluator: Callable[..., Any] | str | None) -> tuple[Callable[..., Any] | None, str | None]:
    """(callable for in-process use, spec string for workers)."""
    if evaluator is None:
        evaluator = DEFAULT_EVALUATOR
    if isinstance(evaluator, str):
        return resolve_evaluator(evaluator), evaluator
    return evaluator, evaluator_spec(evaluator)


ES_LOSS_PREFIX = "early_stop_loss/"


def _initial_early_stop_reference(proxy_cfg: Any) -> dict[str, Any] | None:
    """The proxy's empty :class:`EarlyStopReference` (as a dict) when the proxy config asks for early stopping."""
    if not getattr(proxy_cfg, "early_stop", False):
        return None
    from nasfcos.search.proxy import EarlyStopReference, ProxyConfig

    if not isinstance(proxy_cfg, ProxyConfig):
        return None
    return EarlyStopReference.for_config(proxy_cfg).to_dict()


def _fold_early_stop(reference: dict[str, Any] | None, losses: Iterable[float | None]) -> dict[str, Any] | None:
    """``reference`` after ``EarlyStopReference.update`` with each loss in order (``None`` = not recorded)."""
    if reference is None:
        return None
    from nasfcos.search.proxy import EarlyStopReference

    ref = EarlyStopReference.from_dict(reference)
    for loss in losses:
        ref.update(loss)
    return ref.to_dict()


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the controller with one intra-op thread: it is a tiny LSTM, and on a busy machine torch's thread
    synchronisation made a PPO update ~30x slower than single-threaded (it also keeps its numerics identical
    whatever the machine's thread setting)."""
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def run_search(
    run_dir: str | Path,
    cache_path: str | Path,
    search_cfg: SearchConfig,
    proxy_cfg: Any,
    *,
    resume: bool = False,
    evaluator: Callable[..., Any] | str | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> SearchSummary:
    """Run (or, with ``resume=True``, continue) a search into ``run_dir``; see the module docstring.

    ``evaluator``: ``None`` = :func:`nasfcos.search.proxy.evaluate_candidate`; a callable or a
    ``"module:function"`` string otherwise (process and Ray executors need an importable module-level
    function). ``executor``: an executor to use instead of the one ``search_cfg`` names (the caller closes
    it). ``progress``: show the progress bar on stderr.
    """
    from nasfcos.search.strategies import build_strategy, state_from_bytes, state_to_bytes
    from nasfcos.train.logging import ProgressBar, RunLogger

    started = time.monotonic()
    run_dir = Path(run_dir)
    cache_path = Path(os.path.abspath(cache_path))  # workers (other processes, other nodes) get this path
    plain = _plain_config(cache_path, search_cfg, proxy_cfg)
    eval_fn, eval_spec = _resolve_evaluator(evaluator)
    using_proxy = eval_spec == DEFAULT_EVALUATOR
    if search_cfg.executor != "inline" and executor is None and eval_spec is None:
        raise UserError(
            f"search.executor={search_cfg.executor}: the evaluator must be an importable module-level function "
            "(a lambda or closure only runs with the inline executor)"
        )
    python_path = tuple(p for p in [module_root(eval_spec) if eval_spec else None] if p)

    space = build_search_space(search_cfg.space)
    strategy = build_strategy(search_cfg.strategy, space, search_cfg.seed, **_strategy_settings(search_cfg))
    _prepare_run_dir(run_dir, plain, search_cfg, proxy_cfg, resume)

    store = ResultStore(run_dir / STORE_FILE)
    owns_executor = executor is None
    logger: RunLogger | None = None
    bar: ProgressBar | None = None
    try:
        _check_cache(cache_path, store, using_proxy, proxy_cfg)
        blob = store.state_blob()
        state = _LoopState()
        if blob is not None:
            state_from_bytes(strategy, blob)
            state = _LoopState.from_json(store.get_meta(LOOP_STATE_KEY))
        else:
            state.early_stop_reference = _initial_early_stop_reference(proxy_cfg)
        rows = store.all()
        if any(r.controller_step is not None and r.controller_step > state.step for r in rows):
            raise UserError(f"{run_dir / STORE_FILE}: results newer than the saved search state; the store is inconsistent")
        # Results of earlier, committed batches: the budget already spent and the failure-penalty reference.
        committed = [r for r in rows if r.controller_step is None or r.controller_step < state.step]
        count_before = len(committed)
        worst = min((r.reward for r in committed if r.status != "failed"), default=None)
        best = max((r.reward for r in rows if r.status != "failed"), default=None)
        del rows

        if executor is None:
            if search_cfg.executor == "inline":
                executor = InlineExecutor(eval_fn)
            else:
                executor = build_executor(
                    search_cfg.executor,
                    workers=search_cfg.workers,
                    threads=search_cfg.worker_threads,
                    ray_address=search_cfg.ray_address,
                    ray_num_cpus_per_task=search_cfg.ray_num_cpus_per_task,
                    ray_num_gpus_per_task=search_cfg.ray_num_gpus_per_task,
                    max_retries=search_cfg.max_retries,
                    run_dir=run_dir,
                )
        logger = RunLogger(run_dir, use_tensorboard=search_cfg.tensorboard)
        logger.log_event("resume" if resume else "start", step=state.step, evaluated=store.count(),
                         budget=search_cfg.budget, **executor.describe())
        bar = ProgressBar(total=search_cfg.budget, initial=min(store.count(), search_cfg.budget), desc="search",
                          enabled=progress, text_every=1)
        max_proposals = int(search_cfg.max_proposals_factor * search_cfg.budget)
        stop_reason = "budget"
        fixed_penalty = search_cfg.failure_reward
        if fixed_penalty is None:
            fixed_penalty = _finite_or_none(getattr(proxy_cfg, "failure_reward", None))

        while True:
            if count_before >= search_cfg.budget:
                break
            if state.proposals >= max_proposals:
                stop_reason = "proposal_limit"
                bar.write(f"search: stopped after {state.proposals} proposals ({search_cfg.max_proposals_factor} x "
                          f"budget): the strategy keeps proposing known genotypes")
                break
            step = state.step
            with _single_thread():
                proposals = strategy.propose(search_cfg.batch_size)
            keys = [p.genotype.key() for p in proposals]
            remaining = search_cfg.budget - count_before
            rewards: dict[str, float] = {}
            new_keys: list[str] = []  # this batch's distinct evaluations, in proposal order
            repeats = 0
            for proposal, key in zip(proposals, keys):
                if key in rewards or key in new_keys:  # proposed twice in this batch
                    repeats += 1
                    continue
                row = store.get(key)
                if row is not None and (row.controller_step is None or row.controller_step < step):
                    rewards[key] = row.reward  # known from an earlier batch: reuse, no training
                    repeats += 1
                elif len(new_keys) < remaining:
                    new_keys.append(key)
            # Penalty for failures of this batch: from committed results only (order-independent, resumable).
            if fixed_penalty is not None:
                penalty = fixed_penalty
            elif worst is not None:
                penalty = worst - search_cfg.failure_margin
            else:
                penalty = search_cfg.initial_failure_reward
            tasks = []
            batch_results: dict[str, CandidateResult] = {}
            for index, (proposal, key) in enumerate(zip(proposals, keys)):
                if key not in new_keys or key in batch_results or any(t.key == key for t in tasks):
                    continue
                row = store.get(key)
                if row is not None:  # evaluated in this batch before an interruption
                    batch_results[key] = row
                    continue
                tasks.append(CandidateTask(
                    index=index, key=key, genotype_json=proposal.genotype.to_json(indent=None),
                    actions=tuple(proposal.actions), seed=candidate_seed(search_cfg.seed, key),
                    cache_path=str(cache_path), proxy_cfg=proxy_cfg, evaluator=eval_spec,
                    early_stop_reference=state.early_stop_reference, python_path=python_path,
                ))
            for task, outcome in executor.map_candidates(tasks):
                result = _store_result(task, outcome, step, penalty)
                extra = {}
                if outcome.early_stop_loss is not None and outcome.status != "failed":
                    extra[ES_LOSS_PREFIX + task.key] = float(outcome.early_stop_loss)
                store.commit_step([result], None, meta=extra)  # result + its early-stop loss: one transaction
                stored = store.get(task.key)
                assert stored is not None
                batch_results[task.key] = stored
                if stored.status != "failed":
                    best = stored.reward if best is None else max(best, stored.reward)
                evaluated = store.count()
                scalars = {"reward": stored.reward, "failed": float(stored.status == "failed"),
                           "pruned": float(stored.status == "pruned")}
                if best is not None:
                    scalars["best_reward"] = best
                for name in ("loss_cls", "loss_reg", "loss_ctr", "ap", "gmacs", "params", "wall_time_s"):
                    value = getattr(stored, name)
                    if value is not None:
                        scalars[name] = value
                logger.log(evaluated, scalars, prefix="candidate")
                if stored.status == "failed":
                    logger.log_event("candidate_failed", step=evaluated, key=stored.key, error=stored.error,
                                     penalty=stored.reward)
                bar.update(min(evaluated, search_cfg.budget),
                           {**({"best": best} if best is not None else {}), "cand/h": bar.rate() * 3600})
            for key in new_keys:
                rewards[key] = batch_results[key].reward
            observed = [(p, rewards[k]) for p, k in zip(proposals, keys) if k in rewards]
            with _single_thread():
                stats = strategy.observe(observed) if observed else {}
            state.early_stop_reference = _fold_early_stop(
                state.early_stop_reference, [store.get_meta(ES_LOSS_PREFIX + k) for k in new_keys])
            state.step += 1
            state.proposals += len(proposals)
            state.repeats += repeats
            store.commit_step([], state_to_bytes(strategy), meta={LOOP_STATE_KEY: state.to_json()})
            # Bookkeeping for the next batch (everything below is derived, not state).
            count_before += len(new_keys)
            batch_worst = min((batch_results[k].reward for k in new_keys if batch_results[k].status != "failed"),
                              default=None)
            if batch_worst is not None:
                worst = batch_worst if worst is None else min(worst, batch_worst)
            write_topk(run_dir / TOPK_DIR, store.top_k(search_cfg.top_k))
            update_scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
            update_scalars.update({
                "evaluated": float(count_before), "proposals": float(state.proposals),
                "repeats": float(state.repeats), "batch_new": float(len(new_keys)),
            })
            if observed:
                update_scalars["batch_reward_mean"] = sum(r for _, r in observed) / len(observed)
            if best is not None:
                update_scalars["best_reward"] = best
            logger.log(state.step, update_scalars, prefix="update")

        top = tuple(store.top_k(search_cfg.top_k))
        files = tuple(write_topk(run_dir / TOPK_DIR, list(top)))
        summary = SearchSummary(
            run_dir=run_dir, evaluated=store.count(), failed=store.count("failed"), pruned=store.count("pruned"),
            proposals=state.proposals, repeats=state.repeats, updates=state.step, stop_reason=stop_reason,
            top=top, topk_files=files, wall_time_s=time.monotonic() - started,
        )
        logger.log_event("finish", step=state.step, evaluated=summary.evaluated, failed=summary.failed,
                         stop_reason=stop_reason, best_reward=None if summary.best is None else summary.best.reward,
                         **executor.describe())
        return summary
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        if owns_executor and executor is not None:
            executor.close()
        store.close()
