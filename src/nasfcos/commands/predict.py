"""``nasfcos predict``: run trained weights on images; write PNGs with labelled boxes and a COCO results JSON."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from nasfcos.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="detect objects in images; write drawn PNGs and COCO JSON")
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or a training checkpoint")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw boxes scoring at least this")
    parser.add_argument("--threads", type=int)
    parser.set_defaults(run=run)


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is a UserError."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"images: {path}: image file or folder not found")
    if not paths:
        raise UserError(f"{', '.join(inputs)}: no images found")
    return paths


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from nasfcos.analysis.draw import draw_detections
    from nasfcos.commands.eval import require_checkpoint, require_out_folder
    from nasfcos.io import atomic_write_bytes
    from nasfcos.data.coco_eval import detections_to_coco, save_detections
    from nasfcos.train.trainer import load_trained_model

    require_checkpoint(args.checkpoint)
    out = require_out_folder(Path(args.out))
    images = collect_images(args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_trained_model(args.checkpoint)
    model.eval()
    results = []
    index_entries = []
    for image_id, path in enumerate(images, start=1):
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path}: cannot read image ({exc.__class__.__name__})") from None
        with torch.no_grad():
            detection = model([pil_to_tensor(image).float() / 255.0])[0]
        drawn = draw_detections(
            image, detection["boxes"].tolist(), detection["labels"].tolist(), detection["scores"].tolist(),
            meta["class_names"], min_score=args.min_score,
        )
        buffer = io.BytesIO()
        drawn.save(buffer, format="PNG")
        target = out / f"{path.stem}.png"
        atomic_write_bytes(target, buffer.getvalue())
        results.extend(detections_to_coco([detection], [image_id], meta["category_ids"]))
        index_entries.append({"id": image_id, "file_name": str(path)})
        kept = int((detection["scores"] >= args.min_score).sum())
        print(f"{path} -> {target} ({kept} boxes >= {args.min_score})")
    save_detections(out / "detections.json", results)
    from nasfcos.io import atomic_write_json

    atomic_write_json(out / "images.json", index_entries)
    print(f"detections: {out / 'detections.json'} (image ids in {out / 'images.json'})")
    return 0
