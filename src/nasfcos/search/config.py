"""Every setting of an architecture search, as plain frozen dataclasses (torch-free).

``SearchRunConfig(cache, search, proxy, evaluator, python_path)`` is the layout of a run's ``config.yaml`` and of
``nasfcos search --config`` files: ``search`` (:class:`SearchConfig`, with its ``space``, ``controller`` and
``ppo`` sections) says how the search runs, ``proxy`` (:class:`ProxyConfig`) how one candidate is trained and
scored, ``evaluator`` (``"module:function"``) a user's own function that replaces the proxy task. Defaults are written once, here; the strategies, the proxy and the loop take these objects whole.
:func:`load_search_run_config` resolves the layers (defaults, a run's saved config, preset files,
``--set`` overrides) with the generic loader of :mod:`nasfcos.config`, so every mistake is a one-line
:class:`~nasfcos.errors.UserError` naming the file and the full key.

:data:`RESUMABLE_KEYS` are the keys a resumed run may change: they change how much is searched or where
candidates run, never which genotypes are evaluated or their rewards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from nasfcos.config import _read_yaml, _require, apply_overrides, config_from_dict, config_to_dict

__all__ = [
    "RESUMABLE_KEYS",
    "ControllerConfig",
    "CostRewardConfig",
    "PPOConfig",
    "ProxyConfig",
    "SearchConfig",
    "SearchRunConfig",
    "SpaceConfig",
    "build_search_space",
    "load_search_run_config",
]

#: Config keys that may change when a run is resumed (they do not change which genotypes are evaluated or
#: their rewards): a larger budget continues the search, and the run may move to other hardware.
RESUMABLE_KEYS = frozenset({
    "cache",
    "python_path",
    "search.budget",
    "search.executor",
    "search.workers",
    "search.worker_threads",
    "search.ray_address",
    "search.ray_num_cpus_per_task",
    "search.ray_num_gpus_per_task",
    "search.max_retries",
    "search.candidate_timeout_s",
    "search.max_proposals_factor",
    "search.top_k",
    "search.tensorboard",
    "proxy.device",
    "proxy.threads",
})


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
    """The LSTM policy (FACTS 5: 2 layers, hidden 100). The fields are
    :class:`~nasfcos.search.controller.Controller`'s keyword arguments (``PPOStrategy`` passes them through)."""

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
    a buffer of the last 100 samples). The fields are :class:`~nasfcos.search.ppo.PPOTrainer`'s keyword
    arguments (``PPOStrategy`` passes them through): a new trainer option is added here, once."""

    lr: float = 1e-4
    clip: float = 0.1
    grad_clip: Optional[float] = 2.0
    baseline_decay: float = 0.95
    entropy_weight: float = 0.0
    epochs: int = 4
    buffer_size: int = 100
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        _require(self.lr >= 0, "lr", self.lr, ">= 0 (0 freezes the controller)")
        _require(0 < self.clip < 1, "clip", self.clip, "in (0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0 or null")
        _require(0 <= self.baseline_decay < 1, "baseline_decay", self.baseline_decay, "in [0, 1)")
        _require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _require(self.buffer_size >= 1, "buffer_size", self.buffer_size, ">= 1")


@dataclass(frozen=True)
class ProxyConfig:
    """How one candidate is trained and scored. Defaults are the paper's proxy task (Sec. 4.1, FACTS 5).

    Load presets with ``nasfcos.config.load_config(ProxyConfig, "configs/proxy-paper.yaml", overrides)``.
    """

    width: int = 64  # every decoder op has this many channels (FPN and head)
    epochs: int = 15
    batch_size: int = 200
    lr: float = 8e-4  # Adam
    weight_decay: float = 0.0
    polyak_decay: float = 0.9
    reward: Literal["loss", "ap"] = "loss"
    compute_ap: bool = False  # also compute AP with reward="loss" (costs a post-processing pass)
    fcos: Literal["vanilla", "improved"] = "vanilla"
    concat: Literal["grouped", "dense"] = "grouped"
    early_stop: bool = True
    early_stop_epoch: int = 2  # validate after this epoch; prune if hopeless
    early_stop_margin: float = 1.5  # prune when val loss > running mean + margin x running std at that epoch
    early_stop_min_samples: int = 5  # candidates the reference must have seen before it prunes anything
    early_stop_decay: float = 0.9  # running mean/std decay of the reference
    failure_reward: Optional[float] = None  # reward of failed candidates; None = the loop decides
    max_train_batches: Optional[int] = None  # cap on steps per epoch (tests, smoke runs)
    val_batch_size: Optional[int] = None  # None = batch_size
    val_every: int = 0  # extra validation every N epochs for the history (0 = only early-stop epoch and end)
    grad_clip_norm: Optional[float] = None
    seed_offset: int = 0
    threads: Optional[int] = None  # torch.set_num_threads while evaluating; None = leave as is
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    channels_last: Optional[bool] = None  # None = on CUDA only
    preload: bool = True  # hold the cache in memory on the device (once per process)
    preload_max_gb: float = 16.0  # ... when both splits together are at most this big
    latency_runs: int = 0  # > 0: also time the decoder's batch-1 forward (median of this many, metrics.latency_ms)

    def __post_init__(self) -> None:
        _require(self.width >= 2 and self.width % 2 == 0, "width", self.width, "an even number >= 2")
        _require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(0.0 <= self.polyak_decay < 1.0, "polyak_decay", self.polyak_decay, "in [0, 1)")
        _require(self.early_stop_epoch >= 1, "early_stop_epoch", self.early_stop_epoch, ">= 1")
        _require(self.early_stop_margin >= 0, "early_stop_margin", self.early_stop_margin, ">= 0")
        _require(self.early_stop_min_samples >= 0, "early_stop_min_samples", self.early_stop_min_samples, ">= 0")
        _require(0.0 <= self.early_stop_decay < 1.0, "early_stop_decay", self.early_stop_decay, "in [0, 1)")
        _require(self.failure_reward is None or math.isfinite(self.failure_reward), "failure_reward",
                 self.failure_reward, "a finite number or null")
        _require(self.max_train_batches is None or self.max_train_batches >= 1, "max_train_batches",
                 self.max_train_batches, ">= 1 or null")
        _require(self.val_batch_size is None or self.val_batch_size >= 1, "val_batch_size", self.val_batch_size,
                 ">= 1 or null")
        _require(self.val_every >= 0, "val_every", self.val_every, ">= 0")
        _require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm", self.grad_clip_norm,
                 "> 0 or null")
        _require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or null")
        _require(self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"), "device", self.device,
                 "auto, cpu, cuda or cuda:N")
        _require(self.preload_max_gb >= 0, "preload_max_gb", self.preload_max_gb, ">= 0")
        _require(self.latency_runs >= 0, "latency_runs", self.latency_runs, ">= 0 (0: not measured)")


@dataclass(frozen=True)
class CostRewardConfig:
    """The optional cost-aware reward (:mod:`nasfcos.search.cost_reward` has the formula); off by default, the
    paper's reward stays the default.

    ``metric``: ``gmacs`` (the decoder's, counted by every proxy evaluation) or ``latency_ms`` (its batch-1
    forward time, measured by the proxy when ``proxy.latency_runs`` > 0, or an evaluator's own
    ``latency_ms``). ``target``: the cost at which the reward is unchanged; ``null`` = the cost of
    ``target_arch`` (default ``fpn-fcos``) measured the same way on the run's cache and proxy width when the
    run starts, kept in the results store so a resumed run uses the same number. ``weight``: MnasNet's
    ``|w|`` (0.07: twice the target cost must be ~5 % better to tie)."""

    enabled: bool = False
    metric: Literal["gmacs", "latency_ms"] = "gmacs"
    target: Optional[float] = None
    target_arch: str = "fpn-fcos"
    weight: float = 0.07

    def __post_init__(self) -> None:
        _require(math.isfinite(self.weight) and self.weight >= 0, "weight", self.weight, "a finite number >= 0")
        _require(self.target is None or (math.isfinite(self.target) and self.target > 0), "target", self.target,
                 "a positive number, or null for the cost of target_arch")


@dataclass(frozen=True)
class SearchConfig:
    """How the search runs. Defaults are the paper's (about 2,800 architectures, an update after each one,
    top 20 kept for full training); ``configs/search-*.yaml`` hold CPU-demo and cluster presets.

    ``budget``: distinct evaluations to reach. ``batch_size``: candidates proposed per policy update (and so
    evaluated in parallel). ``workers``: processes (``process``) or CPUs of a local Ray instance (``ray``;
    ``None`` there = all). ``worker_threads``: torch threads per worker (``None``: cores / workers for
    processes, ``ray_num_cpus_per_task`` for Ray). ``max_retries``: retries of a candidate whose worker died.
    ``candidate_timeout_s``: a candidate running longer (process and Ray executors) is stopped and failed.
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
    candidate_timeout_s: Optional[float] = None
    max_proposals_factor: float = 10.0
    top_k: int = 20
    failure_reward: Optional[float] = None
    failure_margin: float = 1.0
    initial_failure_reward: float = -10.0
    tensorboard: bool = True
    space: SpaceConfig = field(default_factory=SpaceConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    cost_reward: CostRewardConfig = field(default_factory=CostRewardConfig)

    def __post_init__(self) -> None:
        _require(self.budget >= 1, "budget", self.budget, ">= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _require(self.workers is None or self.workers >= 1, "workers", self.workers, ">= 1 or null")
        _require(self.worker_threads is None or self.worker_threads >= 1, "worker_threads", self.worker_threads,
                 ">= 1 or null")
        _require(self.ray_num_cpus_per_task >= 0, "ray_num_cpus_per_task", self.ray_num_cpus_per_task, ">= 0")
        _require(self.ray_num_gpus_per_task >= 0, "ray_num_gpus_per_task", self.ray_num_gpus_per_task, ">= 0")
        _require(self.max_retries >= 0, "max_retries", self.max_retries, ">= 0")
        _require(self.candidate_timeout_s is None or self.candidate_timeout_s > 0, "candidate_timeout_s",
                 self.candidate_timeout_s, "> 0 or null")
        _require(self.max_proposals_factor >= 1, "max_proposals_factor", self.max_proposals_factor, ">= 1")
        _require(self.top_k >= 1, "top_k", self.top_k, ">= 1")
        _require(self.failure_reward is None or math.isfinite(self.failure_reward), "failure_reward",
                 self.failure_reward, "a finite number or null")
        _require(self.failure_margin >= 0, "failure_margin", self.failure_margin, ">= 0")
        _require(math.isfinite(self.initial_failure_reward), "initial_failure_reward", self.initial_failure_reward,
                 "a finite number")

@dataclass(frozen=True)
class SearchRunConfig:
    """A whole search run: the feature cache folder, how the search runs and how a candidate is scored.

    ``evaluator``: ``None`` = the proxy task on ``cache`` (:func:`nasfcos.search.proxy.evaluate_candidate`);
    otherwise a ``"module:function"`` that scores a genotype instead (:mod:`nasfcos.search.evaluator`; the
    cache is then optional). ``python_path``: folders put on ``sys.path`` (in this process and in every worker)
    before the evaluator's module is imported; a resumed run may change them (they say where, not what).
    """

    cache: Optional[str] = None
    search: SearchConfig = field(default_factory=SearchConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    evaluator: Optional[str] = None
    python_path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        spec = self.evaluator
        _require(spec is None or (isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))),
                 "evaluator", spec, "'module:function' (e.g. my_objectives:score) or null for the proxy task")


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
) -> SearchRunConfig:
    """The resolved :class:`SearchRunConfig`, later layers winning: defaults <- ``base`` (a run's
    ``config.yaml``, when resuming) <- ``config`` (sections ``cache``, ``search``, ``proxy``) <-
    ``proxy_config`` (a file of ``ProxyConfig`` keys, e.g. ``configs/proxy-paper.yaml``) <- ``overrides``
    (``search.budget=100``, ``proxy.epochs=5``). Each file only changes the keys it names; mistakes are
    one-line ``UserError``s naming the file and the full key."""
    cfg = SearchRunConfig()
    for path, section in ((base, None), (config, None), (proxy_config, "proxy")):
        if path is None:
            continue
        data: Mapping[str, Any] = _read_yaml(Path(path))
        if section is not None:
            data = {section: data}
        cfg = config_from_dict(SearchRunConfig, _deep_merge(config_to_dict(cfg), data), source=str(path))
    return apply_overrides(cfg, overrides)


def build_search_space(cfg: SpaceConfig) -> Any:
    """The :class:`~nasfcos.space.SearchSpace` a :class:`SpaceConfig` describes."""
    from nasfcos.space import AGGREGATIONS, FPN_OPS, SearchSpace, resolve_arch

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
