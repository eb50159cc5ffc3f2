"""``nasfcos report RUN``: write ``report.md`` and PNG figures for a search run or a demo run.

The report (see :mod:`nasfcos.analysis.report`) summarises what ran, the trained models (AP, parameters,
GMACs, latency), the search (reward curve, best architecture drawn, top-k), AP against GMACs, example
detections of the best model and, when a ``search-random/`` sibling exists, PPO against random search.
Missing parts are noted in the report rather than failing it.
"""

from __future__ import annotations

import argparse
from typing import Any

from nasfcos.errors import UserError


def add_parser(subparsers: Any) -> None:
    """Register ``nasfcos report``."""
    parser = subparsers.add_parser(
        "report",
        help="write report.md with PNG figures for a search or demo run",
        description=(
            "Write RUN/report.md and RUN/figures/*.png: what ran, the models table, the search's reward curve, "
            "the best architecture drawn, the top-k, AP against GMACs, example detections and (with a "
            "search-random/ sibling) PPO against random search."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="a search run folder (store.sqlite) or a demo run folder "
                        "(summary.json)")
    parser.add_argument("--examples", type=int, default=4,
                        help="validation images to draw the best model's detections on; 0 for none (default: 4)")
    parser.add_argument("--device", default="cpu", help="device for the example detections (default: cpu)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from nasfcos.analysis.report import write_report

    if args.examples < 0:
        raise UserError(f"--examples: must be 0 or more (got {args.examples})")
    path = write_report(args.run_dir, examples=args.examples, device=args.device)
    print(path)
    return 0
