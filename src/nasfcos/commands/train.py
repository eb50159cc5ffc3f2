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
    parser.add_argument("--arch", help="preset name (nas-fcos, fpn-fcos, ...), genotype JSON file, or a genotype "
                        "written inline (JSON, or the authors' integer list, flat or nested)")
    parser.add_argument("--backbone", help="resnet18, resnet50, resnet101, resnext101_32x4d, mobilenet_v2")
    parser.add_argument("--pretrained", help="local ImageNet weights file for the backbone")
    parser.add_argument("--fpn-width", type=int)
    parser.add_argument("--head-width", type=int)
    parser.add_argument("--fcos", choices=("vanilla", "improved"))
    parser.add_argument("--format", choices=("coco", "voc", "synthetic"), help="data format")
    parser.add_argument("--data", help="training annotations (COCO JSON), VOCdevkit root[:split], or the folder of a "
                        "synthetic set made by `nasfcos data synth` (never generated here)")
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


#: Flags naming each data path, so an error says ``--data`` when the user typed ``--data`` (else the config key).
DATA_FLAGS: dict[str, tuple[str, str]] = {
    "train_path": ("data", "--data"),
    "train_images": ("images", "--images"),
    "val_path": ("val", "--val"),
    "val_images": ("val_images", "--val-images"),
}


def _label(args: argparse.Namespace, attribute: str, flag: str, key: str) -> str:
    return flag if getattr(args, attribute, None) is not None else key


def check_inputs(args: argparse.Namespace, cfg: TrainConfig, run_dir: Path) -> None:
    """Every path the run reads or writes, checked before anything is built or created (a typo costs nothing)."""
    from nasfcos.data.sources import DEFAULT_LABELS, check_data_paths
    from nasfcos.errors import UserError
    from nasfcos.space.presets import resolve_preset

    labels = {key: _label(args, attr, flag, DEFAULT_LABELS[key]) for key, (attr, flag) in DATA_FLAGS.items()}
    check_data_paths(cfg.data, labels)
    try:
        resolve_preset(cfg.model.arch)
    except UserError as exc:
        label = _label(args, "arch", "--arch", "model.arch")
        raise UserError(exc.message if exc.message.startswith("arch") else f"{label}: {exc.message}") from None
    if cfg.model.pretrained is not None and not Path(cfg.model.pretrained).is_file():
        label = _label(args, "pretrained", "--pretrained", "model.pretrained")
        raise UserError(f"{label}: {cfg.model.pretrained}: backbone weights file not found")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out: {run_dir}: is a file; expected a run folder")
    if args.resume and not run_dir.is_dir():
        raise UserError(f"--out: {run_dir}: run folder not found (--resume continues an existing run)")


def _run_name(arch: str) -> str:
    """``fpn-fcos`` for a preset, the file stem for a genotype file, ``custom-<key>`` for an inline genotype."""
    from nasfcos.space.presets import is_inline_genotype, resolve_arch

    if is_inline_genotype(arch):
        return f"custom-{resolve_arch(arch).key()[:8]}"
    return Path(arch).stem


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.out:
        run_dir = Path(args.out)
    elif args.resume:
        from nasfcos.errors import UserError

        raise UserError("--resume: give the run folder to continue with --out RUN")
    else:
        name = _run_name(str(cfg.model.arch))
        run_dir = Path(cfg.runtime.output_dir) / (cfg.runtime.run_name or f"train-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_inputs(args, cfg, run_dir)

    from nasfcos.train.trainer import train

    result = train(cfg, run_dir, resume=args.resume)
    print(f"weights: {result.weights}")
    if result.metrics:
        print("val: " + "  ".join(f"{k}={result.metrics[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"run folder: {run_dir} ({result.steps} steps, {result.seconds:.0f} s)")
    return 0
