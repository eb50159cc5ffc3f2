"""``nasfcos eval``: COCO AP of trained weights on a COCO, VOC or synthetic split."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def load_eval_set(data: str, fmt: str | None, images: str | None, split: str):
    """The data set to evaluate on, read with the same rules as training."""
    from nasfcos.config import DataConfig
    from nasfcos.data.sources import load_split

    path = Path(data.split(":")[0])
    if not path.exists():
        raise UserError(f"{path}: data not found")
    fmt = fmt or guess_format(path)
    if fmt == "synthetic":
        cfg = DataConfig(format="synthetic", train_path=str(path))
        return load_split(cfg, split)
    cfg = DataConfig(format=fmt, train_path=data, train_images=images)
    return load_split(cfg, "train")


def run(args: argparse.Namespace) -> int:
    import torch

    from nasfcos.train.engine import evaluate_model
    from nasfcos.train.evaluate import save_detections, save_metrics
    from nasfcos.train.trainer import load_trained_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_trained_model(args.checkpoint)
    dataset = load_eval_set(args.data, args.format, args.images, args.split)
    if len(dataset.class_names) != meta["num_classes"]:
        raise UserError(
            f"{args.data}: has {len(dataset.class_names)} classes but the model was trained for {meta['num_classes']}"
        )
    metrics, detections = evaluate_model(model, dataset, batch_size=args.batch_size)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    save_detections(out / "detections.json", detections)
    save_metrics(out / "metrics.json", metrics)
    print("| AP | AP50 | AP75 | APs | APm | APl |\n|---|---|---|---|---|---|")
    print("| " + " | ".join(f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    print(f"detections: {out / 'detections.json'}\nmetrics: {out / 'metrics.json'}")
    return 0
