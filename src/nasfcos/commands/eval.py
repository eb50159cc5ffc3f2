"""``nasfcos eval``: COCO AP of trained weights on a COCO, VOC or synthetic split."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="COCO AP/AP50/AP75/APs/APm/APl of trained weights")
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or a checkpoint written by nasfcos train")
    parser.add_argument("--data", required=True, help="COCO JSON, VOCdevkit root[:split], or synthetic folder")
    parser.add_argument("--format", choices=("coco", "voc", "synthetic"), default=None,
                        help="data format (default: guessed from --data)")
    parser.add_argument("--images", help="image folder (COCO)")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="split of a synthetic set")
    parser.add_argument("--out", help="folder for detections.json and metrics.json (default: next to the weights)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.set_defaults(run=run)


def guess_format(path: Path) -> str:
    """``coco`` for a JSON file, ``synthetic`` for a folder with a synthetic manifest, else ``voc``."""
    if path.suffix.lower() == ".json":
        return "coco"
    if (path / "manifest.json").is_file():
        return "synthetic"
    return "voc"


def require_checkpoint(path: str) -> Path:
    """``--checkpoint`` as a path to an existing file (checked before torch loads anything)."""
    checkpoint = Path(path)
    if checkpoint.is_dir():
        raise UserError(f"--checkpoint: {checkpoint}: is a folder; expected model_final.pt or a checkpoint file")
    if not checkpoint.is_file():
        raise UserError(f"--checkpoint: {checkpoint}: not found; expected model_final.pt or a checkpoint file")
    return checkpoint


def require_out_folder(path: Path) -> Path:
    """``--out`` may be missing (it is created when the first file is written) but not a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {path}: is a file; expected a folder")
    return path


def eval_data_config(data: str, fmt: str | None, images: str | None, split: str) -> tuple[Any, str]:
    """``(DataConfig, split to read)`` for ``--data``/``--format``/``--images``/``--split``, paths checked."""
    from nasfcos.config import DataConfig
    from nasfcos.data.sources import check_data_paths

    path = Path(data) if Path(data).exists() else Path(data.split(":")[0])
    if not path.exists():
        raise UserError(f"--data: {path}: not found; expected a COCO JSON file, a VOCdevkit folder or a synthetic set")
    fmt = fmt or guess_format(path)
    if fmt == "synthetic":
        cfg, read = DataConfig(format="synthetic", train_path=str(path)), split
    else:
        cfg, read = DataConfig(format=fmt, train_path=data, train_images=images), "train"
    check_data_paths(cfg, {"train_path": "--data", "train_images": "--images"})
    return cfg, read


def load_eval_set(data: str, fmt: str | None, images: str | None, split: str):
    """The data set to evaluate on, read with the same rules as training."""
    from nasfcos.data.sources import load_split

    cfg, read = eval_data_config(data, fmt, images, split)
    return load_split(cfg, read, labels={"train_path": "--data", "train_images": "--images"})


def run(args: argparse.Namespace) -> int:
    import torch

    from nasfcos.train.engine import evaluate_model
    from nasfcos.data.coco_eval import save_detections, save_metrics
    from nasfcos.train.trainer import load_trained_model

    require_checkpoint(args.checkpoint)
    out = require_out_folder(Path(args.out) if args.out else Path(args.checkpoint).parent)
    dataset = load_eval_set(args.data, args.format, args.images, args.split)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_trained_model(args.checkpoint)
    if len(dataset.class_names) != meta["num_classes"]:
        raise UserError(
            f"{args.data}: has {len(dataset.class_names)} classes but the model was trained for {meta['num_classes']}"
        )
    metrics, detections = evaluate_model(model, dataset, batch_size=args.batch_size)
    save_detections(out / "detections.json", detections)
    save_metrics(out / "metrics.json", metrics)
    print("| AP | AP50 | AP75 | APs | APm | APl |\n|---|---|---|---|---|---|")
    print("| " + " | ".join(f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    print(f"detections: {out / 'detections.json'}\nmetrics: {out / 'metrics.json'}")
    return 0
