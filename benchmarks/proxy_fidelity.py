"""Proxy fidelity (issue 13): does the cheap proxy rank decoders the way full training does? A thin wrapper of
``nasfcos fidelity`` that leaves its tables in ``benchmarks/results``.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/proxy_fidelity.py [--config configs/fidelity-cpu.yaml]
        [--run runs/fidelity-cpu] [--set KEY=VALUE ...] [--max-units K]
    PYTHONPATH=src .venv/bin/python benchmarks/proxy_fidelity.py --estimate [--sample-iters 20]

Default mode runs (or continues: every finished unit is kept, see :mod:`nasfcos.analysis.fidelity`) the study in
``--run`` — exactly ``nasfcos fidelity --config CONFIG --out RUN`` — and writes ``proxy_fidelity.json`` / ``.md``
from the study's ``fidelity.json``: per proxy setting Kendall tau and Spearman rho against the reference AP with
bootstrap intervals, top-3 overlap, seconds per candidate; the reference's seed-to-seed spread against its spread
across decoders. The scatter plot stays in the run folder (``figures/fidelity_scatter.png``).

``--estimate`` measures instead how long the study of ``--config`` would take, from a short timed sample in a
scratch folder: the data, a ``--sample-iters`` backbone training, every distinct cache, each proxy setting on a
few decoders (``--sample-decoders``: ``fpn-fcos``, ``deformable-fpn-fcos`` and random ones), and reference
trainings of ``--sample-iters`` steps on the same decoders. Seconds per training step come from the trainer's log
(intervals between logged steps), the rest of a training (setup, COCO evaluation) is its fixed overhead; each stage
is extrapolated to the config's sizes. Both wall and CPU seconds are given: on a shared machine the wall time is
pessimistic, the CPU time (all threads of this process) is what the work costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "proxy_fidelity"
DEFAULT_RUN = "runs/fidelity-cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(_common.ROOT / "configs" / "fidelity-cpu.yaml"),
                        help="study settings (default: configs/fidelity-cpu.yaml)")
    parser.add_argument("--run", default=DEFAULT_RUN, help="study folder (reused / continued)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="study setting override (repeatable)")
    parser.add_argument("--max-units", type=int, help="stop after K units (run the study in slices)")
    parser.add_argument("--estimate", action="store_true", help="time a short sample and extrapolate; no study")
    parser.add_argument("--sample-iters", type=int, default=20, help="training steps per sampled training")
    parser.add_argument("--sample-decoders", type=int, default=3, help="decoders sampled per stage")
    _common.add_common_arguments(parser, threads=None)
    return parser.parse_args(argv)


def _quick_overrides() -> list[str]:
    return ["data.num_train=16", "data.num_val=8", "data.image_size=64", "backbone.iters=2", "backbone.batch_size=4",
            "backbone.width=16", "decoders.random=1", "decoders.presets=[fpn-fcos,nas-fcos]", "reference.width=16",
            "reference.iters=2", "reference.batch_size=4", "reference.seeds=[0]", "seed_spread.decoders=[fpn-fcos]",
            "seed_spread.seeds=[0,1]", "bootstrap=50", "threads=1"]  # one reference seed: --quick stays this size


def _quick_proxies(cfg: Any) -> Any:
    return replace(cfg, proxies=tuple(replace(s, cache=replace(s.cache, crop=64, images=None),
                                              proxy=replace(s.proxy, width=8, epochs=1, batch_size=8))
                                      for s in cfg.proxies[:2]))


def _config(args: argparse.Namespace) -> Any:
    from nasfcos.analysis.fidelity_config import load_fidelity_config

    overrides = ([*_quick_overrides(), "decoders.presets=[fpn-fcos,deformable-fpn-fcos]"] if args.quick and
                 args.estimate else _quick_overrides() if args.quick else [])
    cfg = load_fidelity_config(args.config, [*overrides, *args.overrides])
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    return _quick_proxies(cfg) if args.quick else cfg


# ------------------------------------------------------------------------------------------------ the study


def study_markdown(record: Mapping[str, Any]) -> str:
    from nasfcos.analysis.fidelity_report import render_report

    body = render_report(record["summary"], None)
    lines = [body.replace("# Proxy fidelity study", f"# Proxy fidelity study ({record['settings']['config']})", 1),
             f"Run folder: `{record['settings']['run']}` (scatter plot: `figures/fidelity_scatter.png` there).", "",
             _common.machine_line(record["machine"], record["load"])]
    lines += [f"- {note}" for note in record["notes"]]
    return "\n".join(lines)


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    from nasfcos.analysis.fidelity import run_fidelity

    cfg = _config(args)
    if args.quick and args.run == DEFAULT_RUN:
        args.run = tempfile.mkdtemp(prefix="fidelity-quick-")
    started = time.perf_counter()
    settings = {"config": _common.display_path(args.config), "run": _common.display_path(args.run),
                "overrides": list(args.overrides), "quick": args.quick}
    record = _common.start_record(NAME, settings, cfg.threads)
    summary = run_fidelity(args.run, cfg, max_units=args.max_units)
    record["summary"] = json.loads((Path(args.run) / "fidelity.json").read_text())
    record["units_run_now"] = len(summary.ran)
    if summary.reused:
        record["notes"].append(f"{summary.reused} units were finished by earlier invocations; the load figures "
                               "describe this invocation only.")
    return _common.conclude(record, started, study_markdown, args.out_dir,
                            robust="tau, rho and AP do not depend on the load; seconds per candidate do")


# ------------------------------------------------------------------------------------------------ the estimate


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _sample(decoders: list[Any], k: int) -> list[Any]:
    """``fpn-fcos`` and ``deformable-fpn-fcos`` when present (the cheap and the slow preset), then random ones."""
    chosen = [d for d in decoders if d.name in ("fpn-fcos", "deformable-fpn-fcos")][: max(1, k - 1)]
    chosen += [d for d in decoders if d.kind == "random"][: max(0, k - len(chosen))]
    return chosen[:k] or decoders[:k]


def _extrapolate(sample: list[Any], seconds: list[float], targets: list[Any]) -> float:
    """Total seconds for ``targets``: a sampled decoder costs what it measured, another one the mean of the sampled
    decoders of its kind (preset / random), or of all sampled ones when none of its kind was sampled."""
    measured = {d.name: t for d, t in zip(sample, seconds)}
    by_kind: dict[str, list[float]] = {}
    for decoder, t in zip(sample, seconds):
        by_kind.setdefault(decoder.kind, []).append(t)
    overall = statistics.fmean(seconds)
    return sum(measured.get(d.name, statistics.fmean(by_kind.get(d.kind, [overall]))) for d in targets)


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    from nasfcos.analysis.fidelity import (
        StudyContext,
        TrainingScorers,
        Unit,
        backbone_identity,
        plan_units,
        study_decoders,
    )

    cfg = _config(args)
    iters = max(2, args.sample_iters)
    sample_cfg = replace(cfg, backbone=replace(cfg.backbone, iters=iters),
                         reference=replace(cfg.reference, iters=iters, checkpoint_period=10**6))
    started = time.perf_counter()
    settings = {"config": _common.display_path(args.config), "sample_iters": iters,
                "sample_decoders": args.sample_decoders, "overrides": list(args.overrides), "quick": args.quick}
    record = _common.start_record(f"{NAME}_estimate", settings, cfg.threads)
    scratch = Path(tempfile.mkdtemp(prefix="fidelity-estimate-"))
    scorers = TrainingScorers(StudyContext(scratch, sample_cfg, say=lambda m: print(m, flush=True)))
    decoders = study_decoders(cfg)
    sample = _sample(decoders, args.sample_decoders)
    units = plan_units(cfg, decoders, backbone_identity(cfg))
    stages: dict[str, Any] = {}

    _, wall, cpu = _timed(scorers.data)
    stages["data"] = {"units": 1, "wall_s": wall, "cpu_s": cpu}
    if cfg.backbone.weights is None:
        _, wall, cpu = _timed(scorers.backbone)
        folder = scorers.backbone().parent
        step = _common.seconds_per_step(folder / "log.jsonl") or wall / iters
        overhead = max(0.0, wall - step * iters)
        full = overhead + step * cfg.backbone.iters
        stages["backbone"] = {"units": 1, "seconds_per_step": step, "wall_s": full,
                              "cpu_s": full * cpu / wall if wall else None, "sampled_wall_s": wall}
    else:
        stages["backbone"] = {"units": 0, "wall_s": 0.0, "cpu_s": 0.0}
    caches = {}
    for setting in cfg.proxies:
        tag = (setting.cache.crop, setting.cache.images, setting.proxy.fcos)
        if tag not in caches:
            _, wall, cpu = _timed(lambda s=setting: scorers.cache(s.cache, s.proxy.fcos))
            caches[tag] = (wall, cpu)
    stages["caches"] = {"units": len(caches), "wall_s": sum(w for w, _ in caches.values()),
                        "cpu_s": sum(c for _, c in caches.values())}

    proxy_rows = []
    for setting in cfg.proxies:
        walls, cpus = [], []
        for decoder in sample:
            unit = next(u for u in units if u.setting is not None and u.setting.name == setting.name
                        and u.decoder.name == decoder.name)
            _, wall, cpu = _timed(lambda u=unit: scorers.proxy(u, scorers.ctx))
            walls.append(wall)
            cpus.append(cpu)
            print(f"  proxy {setting.name} {decoder.name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        proxy_rows.append({"setting": setting.name, "sampled": [d.name for d in sample],
                           "wall_s_per_candidate": statistics.fmean(walls),
                           "cpu_s_per_candidate": statistics.fmean(cpus),
                           "wall_s": _extrapolate(sample, walls, decoders),
                           "cpu_s": _extrapolate(sample, cpus, decoders)})
    stages["proxy"] = {"units": len(decoders) * len(cfg.proxies), "settings": proxy_rows,
                       "wall_s": sum(r["wall_s"] for r in proxy_rows), "cpu_s": sum(r["cpu_s"] for r in proxy_rows)}

    reference_rows = []
    for decoder in sample:
        unit = Unit("reference", decoder, cfg.reference.seeds[0], f"estimate{decoder.key[:10]}")
        _, wall, cpu = _timed(lambda u=unit: scorers.reference(u, scorers.ctx))
        step = _common.seconds_per_step(unit.work_dir(scratch) / "log.jsonl") or wall / iters
        overhead = max(0.0, wall - step * iters)
        full = overhead + step * cfg.reference.iters
        reference_rows.append({"decoder": decoder.name, "seconds_per_step": step, "overhead_s": overhead,
                               "wall_s": full, "cpu_s": full * cpu / wall if wall else None})
        print(f"  reference {decoder.name}: {step:.2f} s/step, overhead {overhead:.1f} s -> {full / 60:.1f} min "
              f"for {cfg.reference.iters} steps", flush=True)
    for stage in ("seed-spread", "reference"):
        trained = [u.decoder for u in units if u.stage == stage]
        stages[stage] = {"units": len(trained),
                         "wall_s": _extrapolate(sample, [r["wall_s"] for r in reference_rows], trained),
                         "cpu_s": _extrapolate(sample, [r["cpu_s"] or 0.0 for r in reference_rows], trained)}
    stages["reference"]["trainings"] = reference_rows
    record["stages"] = stages
    record["decoders"] = len(decoders)
    record["total_wall_s"] = sum(s["wall_s"] for s in stages.values())
    record["total_cpu_s"] = sum(s["cpu_s"] or 0.0 for s in stages.values())
    shutil.rmtree(scratch, ignore_errors=True)  # the sample's data, caches and trainings are of no further use
    record["notes"].append("Extrapolated from the sampled decoders: random decoders differ in cost (separable and "
                           "deformable convs at high resolution are slow on the CPU), so read the totals as +-30 %.")
    return _common.conclude(record, started, estimate_markdown, args.out_dir,
                            robust="CPU seconds are less affected than wall seconds")


def estimate_markdown(record: Mapping[str, Any]) -> str:
    stages = record["stages"]
    rows = [[name, s["units"], _common.fmt(s["wall_s"] / 60, 3), _common.fmt((s["cpu_s"] or 0) / 60, 3)]
            for name, s in stages.items()]
    rows.append(["total", "", _common.fmt(record["total_wall_s"] / 60, 3), _common.fmt(record["total_cpu_s"] / 60, 3)])
    lines = [f"# Proxy fidelity study: time estimate ({record['settings']['config']})", "",
             f"{record['decoders']} decoders; sample: {record['settings']['sample_iters']} training steps, "
             f"{record['settings']['sample_decoders']} decoders per stage.", "",
             _common.markdown_table(["stage", "units", "wall min", "CPU min"], rows), "",
             _common.markdown_table(["proxy setting", "s / candidate (wall)", "s / candidate (CPU)"],
                                    [[r["setting"], _common.fmt(r["wall_s_per_candidate"]),
                                      _common.fmt(r["cpu_s_per_candidate"])] for r in stages["proxy"]["settings"]]),
             "",
             _common.markdown_table(["reference decoder", "s / step", "overhead s", "min per training"],
                                    [[r["decoder"], _common.fmt(r["seconds_per_step"]), _common.fmt(r["overhead_s"]),
                                      _common.fmt(r["wall_s"] / 60)] for r in stages["reference"]["trainings"]]),
             "", _common.machine_line(record["machine"], record["load"])]
    lines += [f"- {note}" for note in record["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _common.set_threads(args.threads)
    return estimate(args) if args.estimate else run_study(args)


if __name__ == "__main__":
    main()
