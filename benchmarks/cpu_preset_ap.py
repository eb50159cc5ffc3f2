"""Accuracy of the CPU training preset on the built-in synthetic set: COCO AP of ``fpn-fcos`` and ``nas-fcos``
over several training seeds.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_preset_ap.py [--config configs/cpu-synth.yaml]
        [--archs fpn-fcos,nas-fcos] [--seeds 0,1,2] [--data runs/data/synth] [--runs runs/cpu-preset]
        [--set KEY=VALUE ...] [--threads 2] [--quick]

What it shows: that the CPU preset (``configs/cpu-synth.yaml``: ResNet-18 trained from scratch with the decoder,
width 64, 256 px, batch 8, 600 iterations) trains a *useful* detector in minutes on 2 cores, for the
hand-designed ``fpn-fcos`` decoder and for the paper's searched ``nas-fcos`` decoder alike — the same thing a
user gets from ``nasfcos train --config configs/cpu-synth.yaml --arch ARCH --data runs/data/synth`` — and how
far apart the two are *relative to their seed-to-seed spread* (``runtime.seed`` changes the initialisation and
the data order; the data set stays the same). One seed per architecture cannot rank them (issue 13).

Each (architecture, seed) trains with :func:`nasfcos.train.trainer.train` into ``<runs>/<arch>/seed<k>`` and is
evaluated on the validation split with pycocotools (AP, AP50, AP75, APs/m/l). A finished run (``metrics.json``
and ``model_final.pt`` present) is reused, a half-finished one resumes from its last checkpoint. The JSON is
rewritten after every run and keeps the runs an earlier invocation measured with the same settings (``measured``
says when), so a study of hours can be stopped at any point — or continued on another machine from the committed
JSON — and rerun. The data set is generated with the ``nasfcos data synth`` defaults (seed 0, 400 train / 100 val
images at 256 px, 6 classes) when ``--data`` does not hold it yet.

Seconds per step are the median over the training log's intervals (time between consecutive logged steps
divided by the steps between them), so a reused run reports its own speed. Accuracy, not speed, is the point of
this benchmark; speed is context.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "cpu_preset_ap"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(_common.ROOT / "configs" / "cpu-synth.yaml"),
                        help="training preset (default: configs/cpu-synth.yaml)")
    parser.add_argument("--archs", default="fpn-fcos,nas-fcos", help="comma-separated presets or genotype files")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (runtime.seed)")
    parser.add_argument("--data", default="runs/data/synth", help="synthetic data folder (made if absent)")
    parser.add_argument("--runs", default="runs/cpu-preset", help="folder for the training runs (reused/resumed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    _common.add_common_arguments(parser, threads=2)
    return parser.parse_args(argv)


def train_one(arch: str, seed: int, args: argparse.Namespace, data_dir: Path, threads: int) -> dict[str, Any]:
    """Train (or reuse / resume) one architecture with the preset and one seed; its metrics and costs."""
    from nasfcos.config import TrainConfig, load_config
    from nasfcos.io import read_json
    from nasfcos.train.checkpoint import latest_checkpoint
    from nasfcos.train.trainer import FINAL_WEIGHTS, train

    run_dir = Path(args.runs) / Path(arch).stem / f"seed{seed}"
    overrides = [f"model.arch={arch}", "data.format=synthetic", f"data.train_path={data_dir}",
                 f"runtime.threads={threads}", f"runtime.seed={seed}", *args.overrides]
    if args.quick:
        overrides += ["solver.max_iter=3", "solver.warmup_iters=1", "solver.steps=[2]", "solver.batch_size=2",
                      "model.fpn_width=16", "model.head_width=16", "data.min_size=[64]", "data.max_size=64",
                      "data.test_min_size=64", "runtime.checkpoint_period=2", "runtime.log_period=1"]
    cfg = load_config(TrainConfig, args.config, overrides)
    finished = (run_dir / "metrics.json").is_file() and (run_dir / FINAL_WEIGHTS).is_file()
    t0 = time.perf_counter()
    if finished:  # report the settings the reused run was trained with, not this invocation's
        metrics = read_json(run_dir / "metrics.json", "metrics")
        cfg = load_config(TrainConfig, run_dir / "config.yaml", [])
    else:
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        metrics = train(cfg, run_dir, resume=resume, quiet=False).metrics or {}
    wall = time.perf_counter() - t0
    return {
        "arch": arch,
        "seed": seed,
        "run_dir": _common.display_path(run_dir),
        "reused": finished,
        "iterations": cfg.solver.max_iter,
        "batch_size": cfg.solver.batch_size,
        "image_size": cfg.data.max_size,
        "seconds_per_step": _common.seconds_per_step(run_dir / "log.jsonl"),
        "wall_s_this_run": round(wall, 1),
        **{key: metrics.get(key) for key in METRIC_KEYS},
    }


def settings_key(config: str, overrides: list[str], quick: bool) -> str:
    """What makes two runs of one (arch, seed) comparable: the preset file, the overrides and ``--quick``."""
    return json.dumps({"config": config, "overrides": sorted(overrides), "quick": quick}, sort_keys=True)


def spread_by_arch(runs: Mapping[str, Mapping[str, Any]], archs: list[str]) -> list[dict[str, Any]]:
    """Per architecture over its seeds: AP / AP50 mean, sample std, min, max; median seconds per step."""
    rows = []
    for arch in archs:
        mine = sorted((r for r in runs.values() if r["arch"] == arch and r.get("AP") is not None),
                      key=lambda r: r["seed"])
        if not mine:
            continue
        row: dict[str, Any] = {"arch": arch, "seeds": [r["seed"] for r in mine]}
        for key in ("AP", "AP50"):
            values = [float(r[key]) for r in mine]
            row[key] = {**_common.spread(values), "values": values}
        steps = [r["seconds_per_step"] for r in mine if r.get("seconds_per_step")]
        row["seconds_per_step"] = statistics.median(steps) if steps else None
        row["iterations"] = mine[0]["iterations"]
        rows.append(row)
    return rows


def _mean_std(stat: Mapping[str, Any]) -> str:
    std = stat["std"]
    return f"{stat['mean']:.3f} ± {std:.3f}" if std is not None else f"{stat['mean']:.3f} (one seed)"


def markdown_of(record: Mapping[str, Any]) -> str:
    settings = record["settings"]
    summary_rows = []
    for row in record["summary"]:
        step = row["seconds_per_step"]
        minutes = None if step is None else step * row["iterations"] / 60
        summary_rows.append([row["arch"], len(row["seeds"]), _mean_std(row["AP"]),
                             f"{row['AP']['min']:.3f}-{row['AP']['max']:.3f}", _mean_std(row["AP50"]),
                             step, minutes])
    summary = _common.markdown_table(
        ["arch", "seeds", "AP mean ± std", "AP min-max", "AP50 mean ± std", "s / step", "training min"],
        summary_rows)
    rows = []
    for run in sorted(record["runs"].values(), key=lambda r: (r["arch"], r["seed"])):
        rows.append([run["arch"], run["seed"], run["AP"], run["AP50"], run["AP75"], run["APs"], run["APm"],
                     run["APl"], run["iterations"], run["seconds_per_step"], run.get("measured")])
    table = _common.markdown_table(
        ["arch", "seed", "AP", "AP50", "AP75", "APs", "APm", "APl", "iterations", "s / step", "measured"], rows)
    lines = [
        f"# CPU preset accuracy on the synthetic set ({settings['config']})",
        "",
        f"Data: `{settings['data']}` (validation split, COCO AP by pycocotools); seeds {settings['seeds']}; "
        f"overrides: {settings['overrides'] or 'none'}. std: sample standard deviation over the seeds.",
        "",
        summary,
        "",
        "Per run:",
        "",
        table,
        "",
        _common.machine_line(record["machine"], record["load"]),
    ]
    lines += [f"- {note}" for note in record["notes"]]
    return "\n".join(lines)


def _previous_runs(out_dir: Path, key: str) -> dict[str, Any]:
    """The runs of an earlier invocation with the same settings, from ``<out_dir>/cpu_preset_ap.json``."""
    path = out_dir / f"{NAME}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict):
        return {}
    return {name: run for name, run in runs.items() if isinstance(run, dict) and run.get("settings_key") == key}


def _conclude(record: dict[str, Any], runs: dict[str, Any], archs: list[str], started: float,
              out_dir: Path) -> dict[str, Any]:
    record["runs"] = dict(runs)
    # Every architecture measured with these settings, the requested ones first: a run of one architecture's
    # further seeds still shows the others it keeps from the JSON.
    record["summary"] = spread_by_arch(runs, [*archs, *sorted({r["arch"] for r in runs.values()} - set(archs))])
    if any(run.get("measured") != record["machine"]["date"] for run in runs.values()):
        record["notes"].append("Some runs were measured by an earlier invocation (`measured` per run); the machine "
                               "line and load figures describe this invocation only.")
    return _common.conclude(record, started, markdown_of, out_dir,
                            robust="AP does not depend on the load; s / step does")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from nasfcos.data.synthetic import ensure_synthetic

    threads = _common.set_threads(args.threads)
    started = time.perf_counter()
    data_dir = Path(args.data)
    synth = {"num_train": 8, "num_val": 4, "image_size": 64} if args.quick else {}
    ensure_synthetic(data_dir, seed=0, **synth)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    config = _common.display_path(args.config)
    key = settings_key(config, list(args.overrides), args.quick)
    settings = {"config": config, "archs": archs, "seeds": seeds, "data": _common.display_path(data_dir),
                "runs": _common.display_path(args.runs), "overrides": list(args.overrides), "quick": args.quick}
    record = _common.start_record(NAME, settings, threads)
    record["notes"].append("Both decoders train from scratch together with a ResNet-18 backbone (no ImageNet weights "
                           "on this machine); a reused run keeps the AP and s/step of the run that made it.")
    out_dir = Path(args.out_dir)
    runs = _previous_runs(out_dir, key)
    finished: dict[str, Any] | None = None
    for seed in seeds:  # seed-major: every architecture gets its next seed before any gets a third
        for arch in archs:
            name = f"{arch}/seed{seed}"
            run_dir = Path(args.runs) / Path(arch).stem / f"seed{seed}"
            if name in runs and not (run_dir / "metrics.json").is_file():
                print(f"{name}: measured {runs[name].get('measured')} (kept from {NAME}.json)", flush=True)
                continue
            run = train_one(arch, seed, args, data_dir, threads)
            previous = runs.get(name)
            measured = previous["measured"] if previous and run["reused"] and previous["AP"] == run["AP"] else None
            runs[name] = {**run, "settings_key": key, "measured": measured or record["machine"]["date"]}
            print(f"{name}: AP {run['AP']}", flush=True)
            # Results after every run: a study of hours killed at a session's limit keeps what it measured.
            finished = _conclude(copy.deepcopy(record), runs, archs, started, out_dir)
    return finished if finished is not None else _conclude(record, runs, archs, started, out_dir)


if __name__ == "__main__":
    main()
