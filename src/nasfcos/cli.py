"""The ``nasfcos`` command: a thin dispatcher over :mod:`nasfcos.commands`.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``. A
:class:`~nasfcos.errors.UserError` anywhere below becomes one line on stderr and exit status 2; Ctrl-C exits
130 after whatever was already written stays on disk (every writer is atomic).
"""

from __future__ import annotations

import os

# OpenMP threads spin at every barrier by default; on a small shared CPU a descheduled thread then stalls
# its partner for whole time slices (measured here: a 2-thread dilated depthwise conv backward went from 0.15 s
# to 8 s while another process held one core). Passive waiting costs little on an idle machine. It must be set
# before torch (libgomp) loads, so it is set here, at the command's entry; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence

from nasfcos import __version__  # noqa: E402
from nasfcos.errors import UserError  # noqa: E402

# Order is the order of `nasfcos --help`.
SUBCOMMANDS: tuple[str, ...] = (
    "demo",
    "data",
    "cache",
    "search",
    "train",
    "eval",
    "predict",
    "export",
    "profile",
    "report",
    "fidelity",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser from every subcommand module that is importable."""
    parser = argparse.ArgumentParser(
        prog="nasfcos",
        description="NAS-FCOS: search, train, evaluate, profile and report FCOS decoders.",
    )
    parser.add_argument("--version", action="version", version=f"nasfcos {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"nasfcos.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nasfcos.commands.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"nasfcos {args.command}: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"nasfcos {args.command}: interrupted; finished files are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
