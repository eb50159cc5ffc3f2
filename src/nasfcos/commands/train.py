"""``nasfcos train``: fully train a detector (preset or searched genotype); ``torchrun``-able for many GPUs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nasfcos.config import TrainConfig, load_config

#: Command-line shortcuts and the config keys they set.
SHORTCUTS: dict[str, str] = {
    "arch": "model.arch",
    "backbone": "model.backbone",
    "pretrained": "model.pretrained",
    "fpn_width": "model.fpn_width",
    "head_width": "model.head_width",
    "fcos": "model.fcos",
    "format": "data.format",
    "data": "data.train_path",
    "images": "data.train_images",
    "val": "data.val_path",
    "val_images": "data.val_images",
    "iters": "solver.max_iter",
    "batch_size": "solver.batch_size",
    "lr": "solver.base_lr",
    "seed": "runtime.seed",
    "threads": "runtime.threads",
    "device": "runtime.device",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every config-driven command shares: a YAML preset and ``--set`` overrides."""
    parser.add_argument("--config", metavar="YAML", help="configuration preset (e.g. configs/cpu-synth.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set solver.base_lr=0.02 (repeatable)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a detector (preset or searched genotype) and evaluate it",
        description="Train an FCOS detector with the searched (or a preset) decoder. Multi-GPU: "
        "torchrun --nproc_per_node=8 -m nasfcos.cli train ...",
    )
    parser.add_argument("--arch", help="preset name (nas-fcos, fpn-fcos, ...) or genotype JSON file")
    parser.add_argument("--backbone", help="resnet18, resnet50, resnet101, resnext101_32x4d, mobilenet_v2")
    parser.add_argument("--pretrained", help="local ImageNet weights file for the backbone")
    parser.add_argument("--fpn-width", type=int)
    parser.add_argument("--head-width", type=int)
    parser.add_argument("--fcos", choices=("vanilla", "improved"))
    parser.add_argument("--format", choices=("coco", "voc", "synthetic"), help="data format")
    parser.add_argument("--data", help="training annotations (COCO JSON), VOCdevkit root[:split], or synthetic folder")
    parser.add_argument("--images", help="training image folder (COCO)")
    parser.add_argument("--val", help="validation annotations / root[:split]")
    parser.add_argument("--val-images", help="validation image folder (COCO)")
    parser.add_argument("--iters", type=int, help="number of training iterations")
    parser.add_argument("--batch-size", type=int, help="total batch size over all processes")
    parser.add_argument("--lr", type=float, help="base learning rate")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", help="auto, cpu, cuda")
    parser.add_argument("--out", help="run folder (default runs/train-<arch>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The resolved config: defaults <- --config YAML <- shortcut flags <- --set overrides."""
    overrides = [f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items() if getattr(args, name, None) is not None]
    return load_config(TrainConfig, args.config, [*overrides, *args.overrides])


def run(args: argparse.Namespace) -> int:
    from nasfcos.train.trainer import train

    cfg = config_from_args(args)
    if args.out:
        run_dir = Path(args.out)
    elif args.resume:
        from nasfcos.errors import UserError

        raise UserError("--resume: give the run folder to continue with --out RUN")
    else:
        name = Path(str(cfg.model.arch)).stem
        run_dir = Path(cfg.runtime.output_dir) / (cfg.runtime.run_name or f"train-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(cfg, run_dir, resume=args.resume)
    print(f"weights: {result.weights}")
    if result.metrics:
        print("val: " + "  ".join(f"{k}={result.metrics[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"run folder: {run_dir} ({result.steps} steps, {result.seconds:.0f} s)")
    return 0
