"""``nasfcos export``: a trained detector to one ONNX file for ONNX Runtime, checked against PyTorch first.

The file holds normalisation, backbone, searched FPN and head (deformable convs lowered to ``GridSample`` +
``Conv``) and, by default, post-processing with NMS. Before the file is written the command runs it in ONNX
Runtime on a few images and compares with PyTorch (see :mod:`nasfcos.export.check`); a disagreement writes
nothing and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError


def add_parser(subparsers: Any) -> None:
    """Register ``nasfcos export``."""
    parser = subparsers.add_parser(
        "export",
        help="export a trained detector to ONNX (deformable convs lowered), checked in ONNX Runtime",
        description=(
            "Export model_final.pt to ONNX: normalisation, backbone, FPN, head and (default) NMS in one graph "
            "that plain ONNX Runtime runs. The file is compared with PyTorch on a few images before it is written."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or a training checkpoint")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--size",
        default=None,
        help="fixed input HEIGHTxWIDTH (default: the model's test short side, square); excludes --dynamic",
    )
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch, height and width (multiples of the model's size_divisible, 32, from 160 px)",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch of a fixed-size export (default: 1)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument(
        "--postprocess",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="output boxes/scores/labels/batch_index after NMS (default) or, with --no-postprocess, the raw "
        "per-level maps",
    )
    parser.add_argument(
        "--check-images", nargs="+", default=None, metavar="IMAGE",
        help="images or folders for the check (resized to the export size; default: synthetic scenes)",
    )
    parser.add_argument("--no-check", action="store_true", help="write without comparing with PyTorch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for export and check")
    parser.set_defaults(run=run)


def _load_check_images(inputs: list[str]) -> list[Any]:
    import torch
    from PIL import Image, UnidentifiedImageError

    from nasfcos.commands.predict import collect_images

    images = []
    for path in collect_images(inputs):
        try:
            with Image.open(path) as handle:
                rgb = handle.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path}: cannot read image ({exc.__class__.__name__})") from None
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
        images.append(data.permute(2, 0, 1).float() / 255.0)
    return images


def run(args: argparse.Namespace) -> int:
    from nasfcos.analysis.profile import parse_size
    from nasfcos.export.exporter import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    size = parse_size(args.size) if args.size is not None else None
    if size is not None and args.dynamic:
        raise UserError(f"--size {args.size} and --dynamic exclude each other; give one")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset: unsupported ONNX opset (got {opset}); expected {MIN_OPSET}..{MAX_OPSET}")
    if args.batch < 1:
        raise UserError(f"--batch: must be at least 1 (got {args.batch})")
    if args.dynamic and args.batch != 1:
        raise UserError(f"--batch {args.batch}: a --dynamic export has a dynamic batch; drop --batch")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be at least 1 (got {args.threads})")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the .onnx file to write")
    check_images = _load_check_images(args.check_images) if args.check_images else None

    import torch

    from nasfcos import __version__
    from nasfcos.detection.weights import load_trained_model
    from nasfcos.export.exporter import ExportCheckError, export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    model, described = load_trained_model(args.checkpoint)
    metadata = {"nasfcos.version": __version__, "nasfcos.checkpoint": Path(args.checkpoint).name}
    for key in ("arch", "backbone", "class_names", "category_ids"):
        if described.get(key) is not None:
            metadata[f"nasfcos.{key}"] = json.dumps(described[key])
    try:
        result = export_onnx(
            model,
            out,
            size=size,
            dynamic=args.dynamic,
            batch=args.batch,
            opset=opset,
            postprocess=args.postprocess,
            check=not args.no_check,
            check_images=check_images,
            metadata=metadata,
        )
    except ExportCheckError as exc:
        print(f"nasfcos export: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
