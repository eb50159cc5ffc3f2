"""``nasfcos demo``: the whole of NAS-FCOS on built-in synthetic data, on the CPU, in minutes."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on built-in data (data, backbone, cache, search, train, eval, profile, report)",
        description="Make a synthetic set, fine-tune a small backbone, cache its features, search decoders with "
        "PPO, fully train the best ones and the FPN-FCOS baseline, evaluate, profile and report. "
        "Rerunning resumes finished stages.",
    )
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="tiny", choices=("tiny", "small"), help="size of the run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nasfcos.demo import format_table, format_verdict, run_demo

    summary = run_demo(args.out, seed=args.seed, scale=args.scale, threads=args.threads)
    print()
    print(format_table(summary))
    verdict = format_verdict(summary)
    if verdict:
        print(f"\n{verdict}")
    print(f"\nreport: {Path(args.out) / 'report.md'}  (total {summary['total_seconds']:.0f} s)")
    return 0
