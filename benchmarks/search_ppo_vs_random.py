"""Does the controller learn? PPO against random search on the same cache, proxy task and budget.

Runs ``nasfcos.search.loop.run_search`` twice per seed — ``strategy=ppo`` into ``OUT/seed<S>/search`` and
``strategy=random`` into ``OUT/seed<S>/search-random`` (the layout ``nasfcos report`` compares) — and reports,
per strategy: the mean reward of the first and of the last quarter of the budget (the paper's Fig. 8 claim
is that it rises), the best reward, and the mean of the five best (what full training would pick from).
Failed and pruned candidates carry penalty rewards, not measurements, so the means use completed ones only.

Example (after ``nasfcos demo`` made a cache)::

    python benchmarks/search_ppo_vs_random.py --cache runs/demo/cache --budget 40 --out runs/ppo-vs-random
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common

_common.ensure_src_on_path()


def strategy_stats(store_path: Path) -> dict[str, Any]:
    """Reward statistics of one finished search."""
    from nasfcos.analysis.plots import quarter_means
    from nasfcos.search.store import ResultStore

    with ResultStore(store_path, readonly=True) as store:
        rows = store.all()
    completed = [r.reward for r in rows if r.status == "ok" and r.reward is not None]
    first, last = quarter_means(completed) or (float("nan"), float("nan"))
    best = sorted(completed, reverse=True)
    return {
        "evaluated": len(rows),
        "completed": len(completed),
        "failed": sum(r.status == "failed" for r in rows),
        "pruned": sum(r.status == "pruned" for r in rows),
        "first_quarter_mean": first,
        "last_quarter_mean": last,
        "rise": last - first,
        "best": best[0] if best else float("nan"),
        "top5_mean": statistics.fmean(best[:5]) if best else float("nan"),
        "dcn_ops_last_quarter": _dcn_share(rows[-max(1, len(rows) // 4):]),
    }


def _dcn_share(rows: list[Any]) -> float:
    """Share of FPN unary ops that are deformable among the given candidates (what the paper's controller found)."""
    from nasfcos.space.genotype import Genotype

    ops = [op for r in rows for cell in Genotype.from_json(r.genotype_json).fpn for op in (cell.op1, cell.op2)]
    return sum(op == "dcn3x3" for op in ops) / max(1, len(ops))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="feature cache folder (nasfcos cache / nasfcos demo)")
    parser.add_argument("--budget", type=int, default=40, help="distinct candidates per strategy")
    parser.add_argument("--batch", type=int, default=4, help="candidates per policy update")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--proxy-config", default=str(_common.ROOT / "configs" / "proxy-cpu.yaml"))
    parser.add_argument("--executor", default="inline", choices=("inline", "process", "ray"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="runs/ppo-vs-random", help="folder for the searches")
    _common.add_common_arguments(parser, threads=1)
    args = parser.parse_args(argv)

    from nasfcos.config import config_from_dict, load_config
    from nasfcos.search.config import ProxyConfig, SearchConfig, SearchRunConfig
    from nasfcos.search.loop import run_search

    threads = _common.set_threads(args.threads)
    budget = 4 if args.quick else args.budget
    proxy_overrides = [f"threads={threads}", "device=cpu"] + (["epochs=1", "max_train_batches=1"] if args.quick else [])
    proxy_cfg = load_config(ProxyConfig, args.proxy_config, proxy_overrides)
    seeds = [int(s) for s in args.seeds.split(",")]
    record = _common.start_record(
        "search_ppo_vs_random",
        {"cache": _common.display_path(args.cache), "budget": budget, "batch": args.batch, "seeds": seeds,
         "proxy": {k: getattr(proxy_cfg, k) for k in ("width", "epochs", "batch_size", "lr", "early_stop")}},
        threads,
    )
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"ppo": [], "random": []}
    for seed in seeds:
        for strategy, folder in (("ppo", "search"), ("random", "search-random")):
            run_dir = Path(args.out) / f"seed{seed}" / folder
            search_cfg = config_from_dict(SearchConfig, {
                "budget": budget, "batch_size": args.batch, "strategy": strategy, "seed": seed,
                "executor": args.executor, "workers": args.workers, "top_k": 5,
            }, source="benchmark")
            t0 = time.perf_counter()
            run_search(run_dir, SearchRunConfig(str(args.cache), search_cfg, proxy_cfg),
                       resume=(run_dir / "store.sqlite").is_file(), progress=not args.quick)
            stats = strategy_stats(run_dir / "store.sqlite")
            stats.update(seed=seed, seconds=round(time.perf_counter() - t0, 1), run_dir=_common.display_path(run_dir))
            results[strategy].append(stats)
    record["results"] = results
    _common.finish_record(record, started)

    rows = []
    for strategy, runs in results.items():
        for stats in runs:
            rows.append([strategy, stats["seed"], stats["completed"], stats["first_quarter_mean"],
                         stats["last_quarter_mean"], stats["rise"], stats["best"], stats["top5_mean"],
                         stats["dcn_ops_last_quarter"], stats["seconds"]])
    table = _common.markdown_table(
        ["strategy", "seed", "completed", "mean reward Q1", "mean reward Q4", "Q4 - Q1", "best", "top-5 mean",
         "dcn share Q4", "seconds"],
        rows,
    )
    verdict = []
    for p, r in zip(results["ppo"], results["random"]):
        verdict.append(
            f"seed {p['seed']}: PPO last-quarter mean {'above' if p['last_quarter_mean'] > r['last_quarter_mean'] else 'NOT above'} "
            f"random ({p['last_quarter_mean']:.3f} vs {r['last_quarter_mean']:.3f}); PPO top-5 mean "
            f"{'above' if p['top5_mean'] > r['top5_mean'] else 'NOT above'} random ({p['top5_mean']:.3f} vs {r['top5_mean']:.3f})"
        )
    record["verdict"] = verdict
    markdown = "\n".join([
        "## PPO vs random search (same cache, proxy task and budget)", "",
        _common.machine_line(record["machine"], record["load"]), "", table, "", *[f"- {v}" for v in verdict],
    ])
    _common.report(markdown, _common.write_outputs(record, markdown, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
