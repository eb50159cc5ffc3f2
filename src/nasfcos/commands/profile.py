"""``nasfcos profile``: parameters, GMACs and (optionally) latency of backbone + decoder, as in Table 2.

Counts come from one forward pass on PyTorch's ``meta`` device (no arithmetic, so 800x1088 with a ResNet-101
takes seconds); deformable convs are counted (see :mod:`nasfcos.analysis.profile`). ``--latency`` times the real
network on the chosen device after warm-up calls. Detector post-processing is not part of either number.
"""

from __future__ import annotations

import argparse
from typing import Any

from nasfcos.errors import UserError


def add_parser(subparsers: Any) -> None:
    """Register ``nasfcos profile``."""
    parser = subparsers.add_parser(
        "profile",
        help="parameters, GMACs and latency of backbone + decoder (paper Table 2)",
        description=(
            "Profile backbone + FCOS decoder: parameters (M) and multiply-accumulates (GMACs, deformable convs "
            "counted) for the whole network and the decoder alone, optionally CPU/GPU latency."
        ),
    )
    parser.add_argument(
        "--arch",
        default="nas-fcos",
        help="preset name (nas-fcos, nas-fcos-fpn, fpn-fcos, deformable-fpn-fcos; optional @W or @F-H width "
        "suffix such as nas-fcos@128-256) or a genotype JSON file (default: nas-fcos)",
    )
    parser.add_argument("--backbone", default="resnet50", help="backbone name (default: resnet50)")
    parser.add_argument("--size", default="800x1088", help="input HEIGHTxWIDTH in pixels (default: 800x1088)")
    parser.add_argument("--fpn-width", type=int, default=None, help="FPN channels (default: the preset's)")
    parser.add_argument("--head-width", type=int, default=None, help="head channels (default: the preset's)")
    parser.add_argument("--num-classes", type=int, default=80, help="object classes (default: 80, COCO)")
    parser.add_argument("--fcos", choices=("vanilla", "improved"), default="vanilla", help="FCOS variant")
    parser.add_argument(
        "--concat", choices=("grouped", "dense"), default=None, help="concat aggregation (default: the preset's)"
    )
    parser.add_argument("--latency", action="store_true", help="also time the forward pass")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for --latency (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device for --latency, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default: 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (default: 10)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the numbers here")
    parser.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    from nasfcos.analysis.profile import parse_size

    size = parse_size(args.size)
    if args.num_classes < 1:
        raise UserError(f"--num-classes: must be at least 1 (got {args.num_classes})")
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be at least 1 (got {value})")
    if args.warmup < 0:
        raise UserError(f"--warmup: must be 0 or more (got {args.warmup})")
    return size


def _device(name: str) -> Any:
    from nasfcos.nn.device import resolve_device

    return resolve_device(name, field="--device")


def run(args: argparse.Namespace) -> int:
    """Build the network, count, optionally time, print a markdown table (and write JSON)."""
    from nasfcos.analysis.profile import format_markdown_table, profile, profile_parts
    from nasfcos.detection.detector import build_detector
    from nasfcos.io import atomic_write_json

    size = _check_args(args)
    device = _device(args.device) if args.latency else None
    # The widths follow DetectorSpec's precedence: --fpn-width/--head-width, else the arch's @ suffix, else the
    # preset's; a flag that contradicts the suffix is a UserError.
    options = {name: getattr(args, name) for name in ("backbone", "num_classes", "fpn_width", "head_width", "fcos",
                                                      "concat")}
    model = build_detector(args.arch, labels={"fpn_width": "--fpn-width", "head_width": "--head-width"}, **options)
    fpn_width, head_width = model.spec.fpn_width, model.spec.head_width
    parts = profile_parts(model, size, meta=True)
    timing: dict[str, Any] | None = None
    if args.latency:
        model.to(device)
        timing = profile(
            model, size, latency=True, threads=args.threads, warmup=args.warmup, repeats=args.repeats, meta=True
        )

    height, width = size
    print(
        f"arch {args.arch} (FPN width {fpn_width}, head width {head_width}), backbone {args.backbone}, "
        f"input {height}x{width}, {args.num_classes} classes; MACs of convs/linears, deformable convs included"
    )
    headers = ["part", "params (M)", "GMACs"]
    rows: list[list[Any]] = [
        ["whole network (backbone + decoder)", f"{parts['whole']['params_m']:.2f}", f"{parts['whole']['gmacs']:.1f}"],
        ["decoder (FPN + head)", f"{parts['decoder']['params_m']:.2f}", f"{parts['decoder']['gmacs']:.1f}"],
    ]
    if timing is not None:
        headers += ["latency median (ms)", "latency p90 (ms)"]
        rows[0] += [f"{timing['latency_ms_median']:.1f}", f"{timing['latency_ms_p90']:.1f}"]
        rows[1] += ["", ""]
    print(format_markdown_table(headers, rows))
    if timing is not None:
        print(f"latency: {args.device}, {timing['threads']} thread(s), {timing['repeats']} timed calls after "
              f"{args.warmup} warm-up, batch 1, no post-processing")

    if args.json_out:
        record: dict[str, Any] = {
            "arch": args.arch,
            "backbone": args.backbone,
            "size": [height, width],
            "num_classes": args.num_classes,
            "fpn_width": fpn_width,
            "head_width": head_width,
            "fcos": args.fcos,
            "whole": parts["whole"],
            "backbone_part": parts["backbone"],
            "decoder": parts["decoder"],
        }
        if timing is not None:
            record["latency"] = {
                key: timing[key] for key in ("latency_ms_median", "latency_ms_p90", "threads", "repeats")
            }
            record["latency"]["device"] = args.device
        path = atomic_write_json(args.json_out, record)
        print(f"wrote {path}")
    return 0

