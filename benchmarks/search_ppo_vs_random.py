"""Does the controller learn on the real proxy? PPO against random search, same cache, preset and budget.

For every seed and strategy, one resumable search run folder (``OUT/seed<S>/search`` for PPO and
``OUT/seed<S>/search-random``, the layout ``nasfcos report`` compares) made by the real
:func:`nasfcos.search.loop.run_search` with the CPU preset (``configs/search-cpu.yaml``: its proxy section,
executor and PPO settings) and the given budget. A killed benchmark continues where it stopped: a finished run
is only re-read, a partial one is resumed (``resume=True``), a new one is started.

Per run, from the results store and ``log.jsonl``: the mean reward of each quarter of the evaluations (in
evaluation order; the paper's Fig. 8 claim is that PPO's rises), the best reward, the mean of the five best
(what full training would pick from), the share of dcn3x3 FPN ops in the last quarter (what the paper's
controller converged to), and the controller diagnostics (KL per update, entropy / its maximum, live share of
the buffer; first and last quarter of the updates). Failed candidates carry penalty rewards and pruned ones a
loss measured after fewer epochs, so the reward statistics use completed (``ok``) candidates only; the counts
say how many there were. Per strategy, over the seeds: mean, standard deviation and range of each statistic.

Results are merged into ``benchmarks/results/search_ppo_vs_random.json`` / ``.md`` (``--out-dir``): each run is
an entry keyed by strategy, seed, budget and settings, replaced when re-measured, kept otherwise, so seeds can
be added run by run. The study in the README (the cache comes from a backbone trained for detection on the same
data first, as the paper's does and as the demo's backbone stage: 230 steps at 128 px, ~2 min)::

    nasfcos data synth --out runs/data/synth
    nasfcos train --config configs/cpu-synth.yaml --data runs/data/synth --iters 230 --set 'data.min_size=[128]' \\
        --set data.max_size=128 --set data.test_min_size=128 --out runs/backbone-r18
    nasfcos cache --data runs/data/synth --format synthetic --backbone resnet18 \\
        --detector-weights runs/backbone-r18/model_final.pt --crop 128 --out runs/cache/synth-r18
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/search_ppo_vs_random.py \\
        --cache runs/cache/synth-r18 --budget 200 --seeds 0,1 --out runs/ppo-vs-random

``--evaluator MODULE:FUNCTION`` replaces the proxy (what the tests use, with a cheap fake evaluator).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import _common

_common.ensure_src_on_path()

NAME = "search_ppo_vs_random"
FOLDERS = {"ppo": "search", "random": "search-random"}
STATS = ("q1", "q2", "q3", "q4", "best", "top5_mean")
DIAGNOSTICS = ("kl", "entropy_ratio", "live_share", "clip_fraction")


# ------------------------------------------------------------------------------------------------ one run


def quarter_means(rewards: Sequence[float | None]) -> list[float | None]:
    """Mean of the non-``None`` rewards in each quarter of the sequence (quarters by position, so that an
    early quarter of PPO is compared with the same evaluations of random search)."""
    n = len(rewards)
    out: list[float | None] = []
    for q in range(4):
        part = [r for r in rewards[q * n // 4:(q + 1) * n // 4] if r is not None]
        out.append(statistics.fmean(part) if part else None)
    return out


def _dcn_share(genotype_jsons: Sequence[str]) -> float | None:
    from nasfcos.space.genotype import Genotype

    ops = []
    for text in genotype_jsons:
        fpn = Genotype.from_json(text).fpn
        if isinstance(fpn, tuple):
            ops += [op for cell in fpn for op in (cell.op1, cell.op2)]
    return sum(op == "dcn3x3" for op in ops) / len(ops) if ops else None


def _update_diagnostics(log_path: Path) -> dict[str, Any]:
    """First- and last-quarter means of the controller's update/* diagnostics in ``log.jsonl``."""
    from nasfcos.logs import read_log

    series: dict[str, list[float]] = {key: [] for key in DIAGNOSTICS}
    if log_path.is_file():
        for record in read_log(log_path):
            if not isinstance(record, dict):
                continue
            for key in DIAGNOSTICS:
                value = record.get(f"update/{key}")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series[key].append(float(value))
    out: dict[str, Any] = {"updates": max(len(v) for v in series.values())}
    for key, values in series.items():
        n = max(1, len(values) // 4)
        out[f"{key}_first"] = statistics.fmean(values[:n]) if values else None
        out[f"{key}_last"] = statistics.fmean(values[-n:]) if values else None
    return out


def run_stats(run_dir: Path) -> dict[str, Any]:
    """Reward statistics and controller diagnostics of one search run folder."""
    from nasfcos.search.store import ResultStore

    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        rows = store.all()
    ok = [r.reward if r.status == "ok" else None for r in rows]
    completed = sorted((r for r in ok if r is not None), reverse=True)
    quarters = quarter_means(ok)
    last_quarter = rows[len(rows) - len(rows) // 4:] if len(rows) >= 4 else rows
    stats: dict[str, Any] = {
        "evaluated": len(rows),
        "completed": len(completed),
        "failed": sum(r.status == "failed" for r in rows),
        "pruned": sum(r.status == "pruned" for r in rows),
        **{f"q{i + 1}": value for i, value in enumerate(quarters)},
        "best": completed[0] if completed else None,
        "top5_mean": statistics.fmean(completed[:5]) if completed else None,
        "dcn_share_q4": _dcn_share([r.genotype_json for r in last_quarter if r.status == "ok"]),
        "candidate_seconds": sum(r.wall_time_s or 0.0 for r in rows),
    }
    stats.update(_update_diagnostics(run_dir / "log.jsonl"))
    return stats


# ------------------------------------------------------------------------------------------------ across seeds


def aggregate(runs: Mapping[str, Mapping[str, Any]], settings_key: str) -> dict[str, dict[str, Any]]:
    """Per strategy, over the seeds measured with ``settings_key``: :func:`_common.spread` of every statistic."""
    out: dict[str, dict[str, Any]] = {}
    for strategy in FOLDERS:
        chosen = [r for r in runs.values() if r["settings_key"] == settings_key and r["strategy"] == strategy]
        if not chosen:
            continue
        keys = list(STATS) + ["dcn_share_q4"] + [f"{d}_{w}" for d in DIAGNOSTICS for w in ("first", "last")]
        out[strategy] = {"seeds": sorted(r["seed"] for r in chosen),
                         **{key: _common.spread([r["stats"].get(key) for r in chosen]) for key in keys}}
    return out


def _pm(s: Mapping[str, Any], digits: int = 3) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    if s["std"] is not None:
        text += f" ± {s['std']:.{digits}f}"
    return text


def verdict(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the table says, in words, without claiming more than the seeds support."""
    if "ppo" not in summary or "random" not in summary:
        return ["only one strategy measured so far"]
    lines = []
    ppo, rnd = summary["ppo"], summary["random"]
    for key, label in (("q4", "last-quarter mean reward"), ("top5_mean", "top-5 mean"), ("best", "best reward")):
        p, r = ppo[key], rnd[key]
        if p["mean"] is None or r["mean"] is None:
            continue
        if p["min"] > r["max"]:
            ranges = "every PPO seed above every random seed"
        elif p["max"] < r["min"]:
            ranges = "every PPO seed below every random seed"
        else:
            ranges = "the seed ranges overlap"
        relation = "above" if p["mean"] > r["mean"] else "not above"
        lines.append(f"PPO {label} {relation} random ({_pm(p)} vs {_pm(r)}; {ranges})")
    p1, p4 = ppo["q1"]["mean"], ppo["q4"]["mean"]
    r1, r4 = rnd["q1"]["mean"], rnd["q4"]["mean"]
    if None not in (p1, p4, r1, r4):
        lines.append(f"rise from Q1 to Q4: PPO {p4 - p1:+.3f}, random {r4 - r1:+.3f}")
    return lines


def markdown_of(record: Mapping[str, Any]) -> str:
    s = record["settings"]
    summary = record["summary"]
    lines = [
        "## PPO vs random search on the proxy task (same cache, preset and budget)", "",
        f"Preset `{s['config']}`, budget {s['budget']} evaluations per run, batch {s['batch_size']}, "
        f"evaluator `{s['evaluator']}`, cache `{s['cache']}`. Mean ± standard deviation over the seeds "
        "(range in brackets); rewards of completed candidates only.", "",
        _common.machine_line(record["machine"], record["load"]), "",
    ]
    rows = []
    for strategy, agg in summary.items():
        row: list[Any] = [strategy, ",".join(map(str, agg["seeds"]))]
        for key in STATS:
            cell = _pm(agg[key])
            if agg[key]["n"] > 1:
                cell += f" [{agg[key]['min']:.3f}, {agg[key]['max']:.3f}]"
            row.append(cell)
        row.append(_pm(agg["dcn_share_q4"], 2))
        rows.append(row)
    lines += [_common.markdown_table(["strategy", "seeds", "Q1", "Q2", "Q3", "Q4", "best", "top-5 mean",
                                      "dcn share Q4"], rows), ""]
    if "ppo" in summary:
        agg = summary["ppo"]
        lines += ["Controller diagnostics (PPO runs; mean over seeds of the first / last quarter of the updates):",
                  "", _common.markdown_table(
                      ["diagnostic", "first quarter", "last quarter"],
                      [[key, _pm(agg[f"{key}_first"]), _pm(agg[f"{key}_last"])] for key in DIAGNOSTICS]), ""]
    run_rows = []
    for run in sorted(record["runs"].values(), key=lambda r: (r["strategy"], r["seed"])):
        if run["settings_key"] != s["settings_key"]:
            continue
        st = run["stats"]
        run_rows.append([run["strategy"], run["seed"], st["evaluated"], st["failed"], st["pruned"], st["q1"], st["q4"],
                         st["best"], st["top5_mean"], st.get("kl_last"), st.get("entropy_ratio_last"),
                         st["candidate_seconds"], run["measured"]])
    lines += ["Runs:", "", _common.markdown_table(
        ["strategy", "seed", "evaluated", "failed", "pruned", "Q1", "Q4", "best", "top-5 mean", "KL (last q.)",
         "entropy / max (last q.)", "candidate s", "measured"], run_rows), ""]
    lines += [f"- {line}" for line in record["verdict"]]
    lines += [f"- {note}" for note in record.get("notes", [])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def _settings_key(cfg: Any, evaluator: str | None) -> str:
    """Digest of everything that makes two runs comparable (search and proxy settings, cache, evaluator)."""
    from nasfcos.config import config_to_dict

    data = config_to_dict(cfg)
    search = dict(data["search"])
    for key in ("seed", "strategy", "workers", "worker_threads", "executor", "tensorboard"):
        search.pop(key, None)  # the same study whatever machine runs it
    proxy = dict(data["proxy"])
    # Options added later that change nothing while off: left out then, so earlier results keep their key.
    if not (search.get("cost_reward") or {}).get("enabled"):
        search.pop("cost_reward", None)
    if not proxy.get("latency_runs"):
        proxy.pop("latency_runs", None)
    payload = {"search": search, "proxy": proxy, "evaluator": evaluator,
               "cache": None if cfg.cache is None else _common.display_path(cfg.cache)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _busy_threads(search: Any) -> int:
    """Threads the search keeps busy: its worker processes x their torch threads (inline: this process)."""
    if search.executor == "inline":
        return 1
    workers = search.workers or 1
    return workers * (search.worker_threads or 1)


def _previous_runs(out_dir: Path) -> dict[str, Any]:
    path = out_dir / f"{NAME}.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    runs = data.get("runs")
    return dict(runs) if isinstance(runs, dict) else {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None,
                        help="feature cache folder (nasfcos cache / nasfcos demo); required for the proxy task")
    parser.add_argument("--config", default=str(_common.ROOT / "configs" / "search-cpu.yaml"),
                        help="search preset (default configs/search-cpu.yaml)")
    parser.add_argument("--budget", type=int, default=200, help="distinct evaluations per run (default 200)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--strategies", default="ppo,random", help="comma-separated (default ppo,random)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. --set search.workers=1 (repeatable)")
    parser.add_argument("--evaluator", default=None, help="MODULE:FUNCTION instead of the proxy task (tests)")
    parser.add_argument("--python-path", action="append", default=[],
                        help="folder to import the evaluator's module from (repeatable)")
    parser.add_argument("--out", default="runs/ppo-vs-random", help="folder for the search runs")
    _common.add_common_arguments(parser, threads=1)
    args = parser.parse_args(argv)
    if args.cache is None and args.evaluator is None:
        parser.error("--cache is required unless --evaluator replaces the proxy task")

    from nasfcos.search.config import load_search_run_config
    from nasfcos.search.loop import run_search

    threads = _common.set_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",")]
    for strategy in strategies:
        if strategy not in FOLDERS:
            raise SystemExit(f"--strategies: unknown strategy {strategy!r}; expected ppo and/or random")
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = 4 if args.quick else args.budget
    overrides = [f"search.budget={budget}", *args.overrides]
    if args.quick:
        overrides += ["proxy.epochs=1", "proxy.max_train_batches=1"]
    base_cfg = load_search_run_config(args.config, overrides=overrides)
    import dataclasses

    if args.cache is not None:
        base_cfg = dataclasses.replace(base_cfg, cache=str(args.cache))
    settings_key = _settings_key(base_cfg, args.evaluator)
    out_dir = Path(args.out_dir)
    record = _common.start_record(NAME, {
        "config": _common.display_path(args.config),
        "cache": None if args.cache is None else _common.display_path(args.cache), "budget": budget,
        "batch_size": base_cfg.search.batch_size, "seeds": seeds, "strategies": strategies,
        "evaluator": args.evaluator or "proxy task", "overrides": overrides, "settings_key": settings_key,
        "ppo": dataclasses.asdict(base_cfg.search.ppo),
        "proxy": {k: getattr(base_cfg.proxy, k) for k in ("width", "epochs", "batch_size", "lr", "early_stop")},
    }, threads, own_threads=_busy_threads(base_cfg.search))
    started = time.perf_counter()
    runs = _previous_runs(out_dir)
    finished: dict[str, Any] | None = None
    for seed in seeds:
        for strategy in strategies:
            run_dir = Path(args.out) / f"seed{seed}" / FOLDERS[strategy]
            cfg = dataclasses.replace(base_cfg, search=dataclasses.replace(base_cfg.search, strategy=strategy, seed=seed))
            resume = (run_dir / "store.sqlite").is_file()
            t0 = time.perf_counter()
            summary = run_search(run_dir, cfg, resume=resume, evaluator=args.evaluator,
                                 python_path=args.python_path or None, progress=not args.quick)
            stats = run_stats(run_dir)
            key = f"{settings_key}/{strategy}/seed{seed}"
            previous = runs.get(key)
            if previous is not None and previous["stats"] == stats:  # a finished run re-read: keep when it ran
                runs[key] = {**previous, "reread": record["machine"]["date"]}
            else:
                runs[key] = {"strategy": strategy, "seed": seed, "budget": budget, "settings_key": settings_key,
                             "run_dir": _common.display_path(run_dir), "stop_reason": summary.stop_reason,
                             "resumed": resume, "seconds_this_invocation": round(time.perf_counter() - t0, 1),
                             "measured": record["machine"]["date"], "stats": stats}
            print(f"{strategy} seed {seed}: {stats['evaluated']} evaluated, best {stats['best']}, "
                  f"Q1 {stats['q1']} -> Q4 {stats['q4']}", flush=True)
            # Results after every run: a study of hours killed at a session's limit keeps what it measured.
            finished = _conclude(copy.deepcopy(record), runs, settings_key, started, out_dir)
    return finished if finished is not None else _conclude(record, runs, settings_key, started, out_dir)


def _conclude(record: dict[str, Any], runs: dict[str, Any], settings_key: str, started: float,
              out_dir: Path) -> dict[str, Any]:
    """Summarise ``runs`` into ``record`` and write the JSON / markdown (atomically, by ``_common``)."""
    record["runs"] = dict(runs)
    if any(run.get("measured") != record["machine"]["date"] for run in runs.values()):
        record["notes"].append("Some runs were measured by an earlier invocation (`measured` in the runs table); "
                               "the machine line and load figures describe this invocation only.")
    record["summary"] = aggregate(runs, settings_key)
    record["verdict"] = verdict(record["summary"])
    return _common.conclude(record, started, markdown_of, out_dir,
                            robust="rewards do not depend on the load, only the candidate seconds do")


if __name__ == "__main__":
    main()
    sys.exit(0)
