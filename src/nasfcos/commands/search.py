"""``nasfcos search``: search FPN + head architectures on a feature cache (paper Sec. 3.3), resumable.

The run folder gets ``config.yaml`` (the resolved settings), ``store.sqlite`` (every evaluated candidate and
the search state), ``log.jsonl`` + TensorBoard scalars and ``topk/rankNN.json`` genotypes ready for
``nasfcos train --arch``. ``--resume RUN`` continues a stopped or killed search exactly where its last
committed step left it (see :mod:`nasfcos.search.loop`); options given with ``--resume`` must agree with the
run's ``config.yaml`` except the budget and where/how candidates run (executor, workers, Ray resources).

Settings come in layers, later ones winning: the defaults (the paper's), the run's own ``config.yaml`` when
resuming, ``--config`` (sections ``search`` and ``proxy``, e.g. ``configs/search-cpu.yaml``),
``--proxy-config`` (``ProxyConfig`` keys only), the shortcut flags, then ``--set search.KEY=V`` /
``--set proxy.KEY=V``.

``--evaluator MODULE:FUNCTION`` scores candidates with a function of your own instead of the proxy task
(``FUNCTION(genotype)`` returns a float reward or a mapping with ``reward`` and other metrics; see
:mod:`nasfcos.search.evaluator`); ``--python-path DIR`` (repeatable) is where its module is imported from, in
this process and in every worker. No feature cache is needed then. Both are recorded in ``config.yaml``:
``--resume`` uses the same evaluator and refuses another one (the python path may change). A bad spec is a
one-line error before anything is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError

#: Command-line shortcuts and the config keys they set.
SHORTCUTS: dict[str, str] = {
    "budget": "search.budget",
    "strategy": "search.strategy",
    "executor": "search.executor",
    "workers": "search.workers",
    "ray_address": "search.ray_address",
    "batch_size": "search.batch_size",
    "seed": "search.seed",
}


def add_parser(subparsers: Any) -> None:
    """Register ``nasfcos search``."""
    parser = subparsers.add_parser(
        "search",
        help="search FPN + head architectures on a feature cache (PPO or random), resumable",
        description=(
            "Search NAS-FCOS decoders: an LSTM controller (PPO) or random search proposes architectures, each is "
            "trained briefly on the cached backbone features (the proxy task) and scored by minus its "
            "meta-val loss, or by a function of your own (--evaluator MODULE:FUNCTION, no cache needed). Kill it "
            "at any time and continue with --resume RUN."
        ),
    )
    parser.add_argument("--cache", metavar="DIR", help="feature cache folder built by `nasfcos cache` "
                        "(not needed with --evaluator)")
    parser.add_argument("--evaluator", metavar="MODULE:FUNCTION",
                        help="score candidates with FUNCTION(genotype) -> float reward (or a mapping with "
                             "'reward' and other metrics) instead of the proxy task")
    parser.add_argument("--python-path", dest="python_path", action="append", default=None, metavar="DIR",
                        help="folder to import the evaluator's module from, here and in every worker (repeatable)")
    parser.add_argument("--budget", type=int, metavar="N", help="distinct architectures to evaluate (paper: ~2800)")
    parser.add_argument("--strategy", choices=("ppo", "random"), help="search strategy (default: ppo)")
    parser.add_argument("--executor", choices=("inline", "process", "ray"),
                        help="where candidates run: this process, a process pool, or Ray (default: inline)")
    parser.add_argument("--workers", type=int, metavar="K",
                        help="worker processes (process) or CPUs of a local Ray instance (ray)")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="join this Ray cluster (auto, host:port or ray://host:port) instead of starting one")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="candidates proposed (and evaluated in parallel) per policy update (default: 1)")
    parser.add_argument("--seed", type=int, metavar="S", help="search seed: same seed, same genotypes")
    parser.add_argument("--config", metavar="YAML", help="search preset with search/proxy sections "
                        "(configs/search-cpu.yaml, configs/search-paper.yaml)")
    parser.add_argument("--proxy-config", metavar="YAML", help="proxy task settings (ProxyConfig keys)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set search.top_k=10 --set proxy.epochs=5 (repeatable)",
    )
    parser.add_argument("--out", metavar="RUN", help="run folder (default runs/search-<strategy>-<time>)")
    parser.add_argument("--resume", metavar="RUN", help="continue the search in this run folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The resolved :class:`~nasfcos.search.config.SearchRunConfig` (see the module docstring for the layers)."""
    from nasfcos.search.config import load_search_run_config
    from nasfcos.search.run_folder import CONFIG_FILE

    base = None
    if args.resume:
        base = Path(args.resume) / CONFIG_FILE
        if not base.is_file():
            raise UserError(f"--resume {args.resume}: not a search run folder (no {CONFIG_FILE})")
    overrides = [f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items()
                 if getattr(args, name, None) is not None]
    if args.cache is not None:
        overrides.insert(0, f"cache={args.cache}")
    cfg = load_search_run_config(args.config, args.proxy_config, [*overrides, *args.overrides], base=base)
    changes: dict[str, Any] = {}
    if getattr(args, "evaluator", None) is not None:
        changes["evaluator"] = args.evaluator
    if getattr(args, "python_path", None):
        changes["python_path"] = tuple(os.path.abspath(p) for p in args.python_path)
    if not changes:
        return cfg
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as exc:  # the config's own check of the spec's form
        raise UserError(f"--evaluator {args.evaluator}: {exc}") from None


def _run_dir(args: argparse.Namespace, strategy: str) -> Path:
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UserError(f"--out {args.out}: --resume continues {args.resume} in place; give only --resume")
        return Path(args.resume)
    if args.out:
        return Path(args.out)
    return Path("runs") / f"search-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fmt(value: float | int | None, spec: str) -> str:
    """``value`` formatted, or ``-`` in the same column width (an evaluator of your own reports no losses)."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return f"{'-':>{width}}" if value is None else format(value, spec)


def print_top(summary: Any, limit: int = 10) -> None:
    """A small table of the best candidates."""
    if not summary.top:
        print("no successful candidate")
        return
    print(f"{'rank':>4}  {'reward':>9}  {'loss':>8}  {'GMACs':>7}  {'params':>9}  {'status':<6}  file")
    for rank, (result, path) in enumerate(zip(summary.top[:limit], summary.topk_files[:limit]), start=1):
        print(f"{rank:>4}  {result.reward:>9.4f}  {_fmt(result.loss_sum, '>8.4f')}  {_fmt(result.gmacs, '>7.3f')}  "
              f"{_fmt(result.params, '>9d')}  {result.status:<6}  {path}")


def run(args: argparse.Namespace) -> int:
    from nasfcos.search.loop import run_search

    cfg = config_from_args(args)
    if cfg.cache is None and cfg.evaluator is None:
        raise UserError("--cache: required (the feature cache folder built by `nasfcos cache`), unless "
                        "--evaluator MODULE:FUNCTION scores the candidates")
    run_dir = _run_dir(args, cfg.search.strategy)
    summary = run_search(run_dir, cfg, resume=bool(args.resume), progress=not args.quiet)
    print(f"evaluated {summary.evaluated} architectures ({summary.failed} failed, {summary.pruned} pruned; "
          f"{summary.repeats} re-proposals reused) in {summary.updates} policy updates, "
          f"{summary.wall_time_s:.0f} s this session")
    if summary.stop_reason != "budget":
        print(f"stopped early: {summary.stop_reason} (the strategy kept proposing known architectures)")
    print_top(summary)
    print(f"run folder: {run_dir} (top-{len(summary.top)} genotypes in {run_dir / 'topk'})")
    return 0
