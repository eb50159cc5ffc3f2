"""``nasfcos data``: make the built-in synthetic set, or check a COCO/VOC dataset for problems.

``nasfcos data synth --out DIR`` writes (or reuses, when the same parameters were used before) the synthetic
set and prints where. ``nasfcos data check PATH`` prints every problem as ``FILE: FIELD: VALUE: MESSAGE`` and
a summary line; exit status 0 when clean, 2 when problems were found (or the input is not a dataset).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nasfcos.errors import UserError


def _size(text: str) -> tuple[int, int]:
    """``256`` or ``HxW`` -> ``(H, W)``."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            return h, w
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW (got {text!r})") from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="make the synthetic set; check a COCO/VOC dataset",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    synth = actions.add_parser("synth", help="generate the built-in synthetic shapes set (COCO format)")
    synth.add_argument("--out", required=True, help="output folder (annotations/, images/, manifest.json)")
    synth.add_argument("--seed", type=int, default=0, help="generation seed (same seed -> identical files)")
    synth.add_argument("--num-train", type=int, default=400, help="training images (default 400)")
    synth.add_argument("--num-val", type=int, default=100, help="validation images (default 100)")
    synth.add_argument("--size", type=_size, default=(256, 256), help="image size N or HxW (default 256)")
    synth.add_argument("--num-classes", type=int, default=6, help="number of shape classes, 1..6 (default 6)")
    synth.add_argument("--force", action="store_true", help="regenerate even if an identical set exists")
    synth.set_defaults(run=run)

    check = actions.add_parser("check", help="report every problem in a COCO JSON / VOC dataset")
    check.add_argument("path", help="COCO .json file, folder with annotations/*.json, or VOC root")
    check.add_argument("--format", choices=("coco", "voc"), default=None, help="default: guessed from PATH")
    check.add_argument("--images", default=None, help="COCO image folder (default: found next to the JSON)")
    check.add_argument("--split", default="trainval", help="VOC split name (default trainval)")
    check.add_argument("--years", default=None, help="VOC years, comma separated (default: all found)")
    check.add_argument("--no-verify-images", dest="verify_images", action="store_false",
                       help="skip opening every image (faster; no missing/corrupt/size checks)")
    check.set_defaults(run=run)
    parser.set_defaults(run=run, _data_parser=parser)


def _run_synth(args: argparse.Namespace) -> int:
    from nasfcos.data.synthetic import ensure_synthetic, make_synthetic

    params = dict(seed=args.seed, num_train=args.num_train, num_val=args.num_val, image_size=args.size,
                  num_classes=args.num_classes)
    info = make_synthetic(args.out, **params) if args.force else ensure_synthetic(args.out, **params)
    verb = "reused" if info.reused else f"wrote in {info.seconds:.1f} s"
    print(f"synthetic set {verb}: {info.root}")
    print(f"  train: {info.num_train} images, {info.num_train_objects} objects -> {info.train_json}")
    print(f"  val:   {info.num_val} images, {info.num_val_objects} objects -> {info.val_json}")
    print(f"  classes: {', '.join(info.class_names)}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from nasfcos.data.check import check_dataset

    years = [y.strip() for y in args.years.split(",") if y.strip()] if args.years else None
    report = check_dataset(args.path, verify_images=args.verify_images, format=args.format,
                           image_root=args.images, split=args.split, years=years)
    for line in report.lines():
        print(line)
    print(report.summary_line(), file=sys.stdout)
    return 0 if report.ok else 2


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "data_command", None)
    if action == "synth":
        return _run_synth(args)
    if action == "check":
        return _run_check(args)
    args._data_parser.print_help()
    raise UserError("data: missing action; expected 'synth' or 'check'")
