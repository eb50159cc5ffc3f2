"""``nasfcos cache``: pre-compute the search's feature cache (frozen-backbone C2..C5, FCOS targets, crop GT).

The training images are split into meta-train / meta-val (paper: 4000 / 1715 of VOC train), every image is
resized to short side ``--crop`` and randomly cropped to a square (seeded per image), and the frozen backbone
runs once over each crop. Running the command again with the same inputs reuses the cache at once; other
inputs rebuild it in place (``--no-overwrite`` refuses instead). See :mod:`nasfcos.data.cache` for the layout.

Example (the paper's setting)::

    nasfcos cache --data VOCdevkit/VOC2012:train --format voc --backbone resnet50 \\
        --detector-weights runs/r50-voc/model_final.pt --crop 384 --meta-train 4000 --meta-val 1715 \\
        --out runs/cache/voc-r50
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError


def count_or_fraction(text: str) -> int | float:
    """``4000`` -> 4000 images; ``0.7`` -> 70 % of the images."""
    try:
        if any(ch in text for ch in ".eE"):
            value = float(text)
            if not 0.0 < value < 1.0:
                raise ValueError
            return value
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of images (e.g. 4000) or a fraction in (0, 1) (e.g. 0.7), got {text!r}") from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache", help="pre-compute backbone features and FCOS targets for the search",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="COCO annotation JSON, VOCdevkit root[:split] "
                        "(default split trainval), or synthetic folder")
    parser.add_argument("--format", choices=("coco", "voc", "synthetic"), default=None,
                        help="data format (default: guessed from --data)")
    parser.add_argument("--images", help="COCO image folder (default: found next to the JSON)")
    parser.add_argument("--backbone", required=True,
                        help="resnet18, resnet50, resnet101, resnext101_32x4d or mobilenet_v2")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local backbone weights file (torchvision/timm layout)")
    weights.add_argument("--detector-weights", help="weights of a detector trained with nasfcos train "
                         "(model_final.pt); its backbone is used, as the paper fine-tunes it on VOC first")
    parser.add_argument("--crop", type=int, default=384, help="short side and square crop size (default 384)")
    parser.add_argument("--meta-train", type=count_or_fraction, default=0.7,
                        help="meta-train images: a count or a fraction (default 0.7 = 4000 of VOC's 5715)")
    parser.add_argument("--meta-val", type=count_or_fraction, default=None,
                        help="meta-val images: a count or a fraction (default: the rest)")
    parser.add_argument("--seed", type=int, default=0, help="split and crop seed (default 0)")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--fcos", choices=("vanilla", "improved"), default="vanilla",
                        help="target rules to cache (improved caches both; default vanilla)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="feature precision on disk (default float16)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per backbone pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="CPU threads for torch while caching")
    parser.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                        help="fail instead of rebuilding when --out holds a cache made from other inputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _guess_format(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "coco"
    if (path / "manifest.json").is_file() and (path / "annotations").is_dir():
        return "synthetic"
    return "voc"


def load_training_set(data: str, fmt: str | None, images: str | None) -> Any:
    """The training split described on the command line, read with the same rules as training.

    Every path is checked first (one-line errors naming ``--data``/``--images``); nothing is created here.
    """
    from nasfcos.config import DataConfig
    from nasfcos.data.sources import check_data_paths, load_split

    path = Path(data) if Path(data).exists() else Path(data.split(":")[0])
    if not path.exists():
        raise UserError(f"--data: {path}: not found; expected a COCO JSON file, a VOCdevkit folder or a synthetic set")
    fmt = fmt or _guess_format(path)
    config = DataConfig(format=fmt, train_path=data, train_images=images)  # type: ignore[arg-type]
    labels = {"train_path": "--data", "train_images": "--images"}
    check_data_paths(config, labels)
    dataset = load_split(config, "train", labels=labels)
    if dataset is None or len(dataset) == 0:
        raise UserError(f"--data: {data}: no images found")
    return dataset


def check_outputs(args: argparse.Namespace) -> None:
    """``--out`` and the weights files, checked before the data set is read or any folder is made."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out}: is a file; expected a cache folder")
    for flag, value in (("--weights", args.weights), ("--detector-weights", args.detector_weights)):
        if value is None:
            continue
        if Path(value).is_dir():
            raise UserError(f"{flag}: {value}: is a folder; expected a weights file")
        if not Path(value).is_file():
            raise UserError(f"{flag}: {value}: weights file not found")


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


def run(args: argparse.Namespace) -> int:
    from nasfcos.data.cache import build_cache

    check_outputs(args)
    dataset = load_training_set(args.data, args.format, args.images)
    cache = build_cache(
        dataset, args.out, backbone=args.backbone, weights=args.weights, detector_weights=args.detector_weights,
        crop=args.crop, meta_train=args.meta_train, meta_val=args.meta_val, seed=args.seed,
        batch_size=args.batch_size, device=args.device, threads=args.threads, fcos=args.fcos, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.quiet)
    manifest = cache.manifest
    splits = manifest["splits"]
    if cache.reused:
        print(f"feature cache reused (same inputs): {cache.path}")
    else:
        print(f"feature cache built in {cache.seconds:.1f} s: {cache.path}")
    print(f"  backbone: {manifest['backbone']} ({manifest['weights']['kind']}), crop {manifest['crop']}, "
          f"seed {manifest['seed']}, {manifest['dtype']}, targets: {', '.join(manifest['fcos_modes'])}")
    print(f"  meta-train: {splits['train']['size']} images, {splits['train']['num_objects']} objects; "
          f"meta-val: {splits['val']['size']} images, {splits['val']['num_objects']} objects")
    shapes = ", ".join(f"{k} {'x'.join(str(x) for x in v)}" for k, v in manifest["feature_shapes"].items())
    print(f"  features: {shapes}")
    print(f"  size on disk: {_megabytes(cache.cache_nbytes)}")
    return 0
