"""``nasfcos fidelity``: measure how well proxy settings rank decoders against full training (resumable).

See :mod:`nasfcos.analysis.fidelity` for the study and :mod:`nasfcos.analysis.fidelity_config` for the settings
(``configs/fidelity-cpu.yaml`` is the CPU preset). The run folder gets ``fidelity.yaml`` (the resolved
settings), ``decoders.json``, one record per finished unit under ``units/``, the training runs and caches, and
at the end of every invocation ``report.md``, ``fidelity.json`` and ``figures/fidelity_scatter.png`` for what is
finished so far (``nasfcos report RUN`` rewrites them).

Rerunning the same command (or ``--resume RUN``) continues: finished units are skipped, an interrupted training
resumes from its last checkpoint. ``--max-units K`` stops after K units (run a long study in slices),
``--stages`` runs only some stages, ``--plan`` lists the units and what is finished without running anything.

Test hook (not for users): the environment variable ``NASFCOS_FIDELITY_SCORERS=module:callable`` replaces the
real trainer and proxy by the :class:`~nasfcos.analysis.fidelity.Scorers` that callable returns (it receives the
study context); the test suite uses it to kill and resume real ``nasfcos fidelity`` processes cheaply.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError


def add_parser(subparsers: Any) -> None:
    """Register ``nasfcos fidelity``."""
    parser = subparsers.add_parser(
        "fidelity",
        help="proxy-fidelity study: rank correlation of proxy settings with full training (resumable)",
        description=(
            "Train N decoders fully (the reference, with a seed-spread stage) and score each with several proxy "
            "settings; report Kendall tau / Spearman rho with bootstrap intervals, top-k overlap and seconds per "
            "candidate. Kill it at any time and rerun the same command (or --resume RUN) to continue."
        ),
    )
    parser.add_argument("--config", metavar="YAML", help="study settings (e.g. configs/fidelity-cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set reference.iters=200 (repeatable)")
    parser.add_argument("--out", metavar="RUN", help="run folder (default runs/fidelity)")
    parser.add_argument("--resume", metavar="RUN", help="continue the study in RUN with its saved fidelity.yaml")
    parser.add_argument("--stages", metavar="LIST",
                        help="comma-separated stages to run: seed-spread, proxy, reference (default: all)")
    parser.add_argument("--max-units", type=int, metavar="K", help="stop after running K units")
    parser.add_argument("--retry-failed", action="store_true", help="run failed units again")
    parser.add_argument("--plan", action="store_true", help="list the units and their state; run nothing")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report of RUN")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's own progress lines")
    parser.set_defaults(run=run)


def _config_and_dir(args: argparse.Namespace) -> tuple[Any, Path]:
    from nasfcos.analysis.fidelity import CONFIG_FILE
    from nasfcos.analysis.fidelity_config import load_fidelity_config

    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise UserError(f"--out {args.out}: --resume continues {args.resume} in place; give only --resume")
        if args.config:
            raise UserError(f"--config {args.config}: --resume uses the run's own {CONFIG_FILE}; change settings "
                            "with --set, or rerun with --config and --out")
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise UserError(f"--resume {args.resume}: not a fidelity study folder (no {CONFIG_FILE})")
        return load_fidelity_config(None, args.overrides, base=saved), run_dir
    run_dir = Path(args.out) if args.out else Path("runs") / "fidelity"
    return load_fidelity_config(args.config, args.overrides), run_dir


def _print_plan(cfg: Any, run_dir: Path) -> None:
    from nasfcos.analysis.fidelity import backbone_identity, plan_units, read_records, study_decoders

    decoders = study_decoders(cfg)
    records = read_records(run_dir)
    for decoder in decoders:
        print(f"decoder {decoder.name:<22} {decoder.kind:<6} {decoder.key[:12]}")
    for unit in plan_units(cfg, decoders, backbone_identity(cfg)):
        record = records.get(unit.id)
        state = ("todo" if record is None else "stale" if record.get("fingerprint") != unit.fingerprint
                 else str(record.get("status")))
        seconds = "" if record is None else f" {float(record.get('seconds') or 0):.1f} s"
        print(f"{unit.stage:<12} {unit.id:<48} {state}{seconds}")


def run(args: argparse.Namespace) -> int:
    from nasfcos.analysis.fidelity import SCORERS_ENV, STAGES, load_scorers, run_fidelity
    from nasfcos.analysis.fidelity_report import write_fidelity_report

    if args.report_only:
        target = args.resume or args.out
        if not target:
            raise UserError("--report-only: give the study folder with --out RUN or --resume RUN")
        print(write_fidelity_report(target))
        return 0
    cfg, run_dir = _config_and_dir(args)
    stages = STAGES if not args.stages else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if args.plan:
        _print_plan(cfg, run_dir)
        return 0
    spec = os.environ.get(SCORERS_ENV)
    scorers = (lambda ctx: load_scorers(spec, ctx)) if spec else None
    summary = run_fidelity(run_dir, cfg, scorers=scorers, stages=stages, max_units=args.max_units,
                           retry_failed=args.retry_failed, verbose=args.verbose)
    print(f"ran {len(summary.ran)} units in {summary.seconds:.0f} s ({summary.reused} finished earlier, "
          f"{summary.remaining} still to run)")
    print(f"report: {summary.report}")
    return 0
