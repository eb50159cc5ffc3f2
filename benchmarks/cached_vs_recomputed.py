"""The paper's central speed-up: train a decoder on CACHED backbone features vs recomputing the frozen backbone.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/cached_vs_recomputed.py [--backbones resnet18,resnet50]
        [--size 384] [--batch 8] [--steps 5] [--warmup 2] [--width 64] [--arch nas-fcos] [--threads 2] [--quick]

NAS-FCOS (Sec. 3.3) freezes the backbone during the search, so its features can be computed once and stored;
every candidate decoder then trains on the stored features. This script measures what that buys, per
training step and extrapolated to the paper's proxy epoch (4000 meta-train images; batch 200 = 20 steps):

- **cached**: the features ``C2..C5`` of the step's images are read from float16 ``.npy`` files opened with
  ``np.load(mmap_mode="r")`` (written with ``np.lib.format.open_memmap`` into a temporary folder, the layout
  of :mod:`nasfcos.data.cache`), converted to float32, then the decoder step runs;
- **recomputed**: the frozen backbone (eval mode, frozen BN, ``torch.no_grad``) runs on the step's images
  (already decoded, cropped and normalised, in memory), then the same decoder step runs.

The decoder step is the proxy's (:mod:`nasfcos.search.proxy`): ``Decoder(genotype, width, width)`` forward,
FCOS losses against precomputed targets, backward, Adam (lr 8e-4), Polyak update (decay 0.9). Both paths use
their own decoder built from the same seed. Steps alternate between the two paths (cached, recomputed,
cached, ...) after the warm-up steps, so background load affects both alike; medians over ``--steps``. Two
ratios: of the two step medians, and ``(backbone + d) / (read + d)`` with ``d`` the median decoder time pooled
over both paths' steps — the decoder does the same work in both, so pooling removes most of the noise that a
busy machine puts into the first ratio.

What this does *not* count, all of which favour the cache further: decoding and cropping the images (the
recomputed path starts from tensors in memory), FCOS target assignment (precomputed for both, as the cache
stores it), disk reads (the ``.npy`` files were just written, so they are in the page cache — like the proxy's
``preload`` which holds the cache in memory; a 50 GB ResNet-50 VOC cache read from disk costs extra). The
cached feature values are one real backbone batch tiled over all rows: the cost of reading and of the decoder
does not depend on the values.

Extrapolation assumes the time per image does not depend on the batch size (CPU convolutions scale about
linearly in the batch); per epoch = seconds per image x 4000; per proxy candidate = 15 epochs (training only,
no validation).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "cached_vs_recomputed"
PAPER_TRAIN_IMAGES = 4000
PAPER_BATCH = 200
PAPER_EPOCHS = 15
LEVELS = ("c2", "c3", "c4", "c5")


def random_targets(n: int, size: int, num_classes: int, seed: int) -> list[dict[str, Any]]:
    """``n`` images' worth of 2-6 random boxes (longer side log-uniform in 16 px .. 0.8 x size)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 7, (1,), generator=generator))
        log_lo, log_hi = math.log(16.0), math.log(0.8 * size)
        sides = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(k, 2, generator=generator))
        corner = torch.rand(k, 2, generator=generator) * (size - sides)
        boxes = torch.cat([corner, corner + sides], dim=1)
        labels = torch.randint(0, num_classes, (k,), generator=generator)
        out.append({"boxes": boxes, "labels": labels})
    return out


class DecoderTrainer:
    """One decoder with its optimiser and Polyak averager; :meth:`step` is one proxy training step."""

    def __init__(self, genotype: Any, channels: dict[str, int], num_classes: int, width: int, concat: str,
                 seed: int) -> None:
        import torch

        from nasfcos.nn.decoder import Decoder
        from nasfcos.search.polyak import PolyakAverager

        torch.manual_seed(seed)
        self.decoder = Decoder(genotype, channels, num_classes, fpn_width=width, head_width=width,
                               fcos="vanilla", concat=concat).train()
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=8e-4)
        self.averager = PolyakAverager(self.decoder, 0.9)

    def step(self, features: dict[str, Any], targets: Any) -> float:
        from nasfcos.detection.losses import fcos_losses
        from nasfcos.detection.points import flatten_levels

        outputs = self.decoder(features)
        losses = fcos_losses(flatten_levels(outputs.cls_logits), flatten_levels(outputs.bbox_reg),
                             flatten_levels(outputs.centerness).squeeze(-1), targets, mode="vanilla")
        loss = losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.averager.update()
        return float(loss.detach())


def count_gmacs(backbone: Any, decoder: Any, sample: dict[str, Any], size: int) -> dict[str, float | None]:
    """Forward GMACs per image of the backbone and of the decoder (context for the ratio: training the
    decoder costs about 3 forwards, the frozen backbone 1)."""
    from nasfcos.analysis.profile import profile

    try:
        backbone_gmacs = float(profile(backbone, (size, size), meta=True)["gmacs"])
        one = {level: value[:1] for level, value in sample.items()}
        decoder_gmacs = float(profile(decoder, example_inputs=(one,), meta=True)["gmacs"])
    except Exception:  # noqa: BLE001 - a count is context, not the measurement
        return {"backbone_gmacs": None, "decoder_gmacs": None}
    finally:
        decoder.train()
    return {"backbone_gmacs": backbone_gmacs, "decoder_gmacs": decoder_gmacs}


def slice_targets(targets: Any, start: int, stop: int) -> Any:
    from nasfcos.detection.targets import FCOSTargets

    return FCOSTargets(*(value[start:stop] for value in targets))


def measure_backbone(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Seconds per step (and its parts) of both paths for one backbone."""
    import numpy as np
    import torch

    from nasfcos.data.cache import level_sizes
    from nasfcos.detection.points import DEFAULT_STRIDES, level_points
    from nasfcos.detection.targets import DEFAULT_RANGES, assign_targets_batch
    from nasfcos.nn.backbones import build_backbone
    from nasfcos.space.presets import get_preset

    torch.manual_seed(0)
    backbone = build_backbone(name, weights=None).eval()
    backbone.requires_grad_(False)
    total_steps = args.warmup + args.steps
    n = args.batch * total_steps
    images = torch.randn(n, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    # The cache: float16 .npy files, one row per image (one real backbone batch tiled over the rows).
    with torch.no_grad():
        sample = backbone(images[: args.batch])
    shapes = {level: tuple(int(x) for x in sample[level].shape[1:]) for level in LEVELS}
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    bytes_per_image = 0
    for level in LEVELS:
        array = np.lib.format.open_memmap(folder / f"{level}.npy", mode="w+", dtype=np.float16, shape=(n, *shapes[level]))
        block = sample[level].to(torch.float16).numpy()
        for start in range(0, n, args.batch):
            array[start:start + args.batch] = block[: min(args.batch, n - start)]
        array.flush()
        bytes_per_image += int(np.prod(shapes[level])) * 2
        del array
    cache = {level: np.load(folder / f"{level}.npy", mmap_mode="r") for level in LEVELS}

    # FCOS targets of every image, assigned once (the cache stores them; the recomputed path gets them too).
    points = level_points(level_sizes(shapes), DEFAULT_STRIDES)
    targets = assign_targets_batch(points, random_targets(n, args.size, args.num_classes, seed=2), DEFAULT_STRIDES,
                                   ranges=DEFAULT_RANGES)

    preset = get_preset(args.arch)
    channels = dict(backbone.out_channels)
    trainers = {path: DecoderTrainer(preset.genotype, channels, args.num_classes, args.width, preset.concat, seed=0)
                for path in ("cached", "recomputed")}
    parts: dict[str, dict[str, list[float]]] = {p: {"data": [], "decoder": [], "step": []} for p in trainers}
    losses: dict[str, list[float]] = {p: [] for p in trainers}

    def run(path: str, step: int, timed: bool) -> None:
        start, stop = step * args.batch, (step + 1) * args.batch
        t0 = time.perf_counter()
        if path == "cached":
            features = {level: torch.from_numpy(np.array(cache[level][start:stop])).float()  # copy = the read
                        for level in LEVELS}
        else:
            with torch.no_grad():
                features = backbone(images[start:stop])
        t1 = time.perf_counter()
        losses[path].append(trainers[path].step(features, slice_targets(targets, start, stop)))
        t2 = time.perf_counter()
        if timed:
            parts[path]["data"].append(t1 - t0)
            parts[path]["decoder"].append(t2 - t1)
            parts[path]["step"].append(t2 - t0)

    for step in range(args.warmup):
        for path in trainers:
            run(path, step, timed=False)
    for step in range(args.warmup, total_steps):
        for path in (("cached", "recomputed") if step % 2 == 0 else ("recomputed", "cached")):
            run(path, step, timed=True)

    result: dict[str, Any] = {"backbone": name, "feature_shapes": {k: list(v) for k, v in shapes.items()},
                              "cache_mb_per_image": bytes_per_image / 1e6}
    result.update(count_gmacs(backbone, trainers["cached"].decoder, sample, args.size))
    for path in trainers:
        for part, values in parts[path].items():
            result[f"{path}_{part}_s"] = _common.summarize(values)["median"]
        result[f"{path}_step_p90_s"] = _common.percentile(parts[path]["step"], 90)
        result[f"{path}_final_loss"] = losses[path][-1]
    result["speedup"] = result["recomputed_step_s"] / result["cached_step_s"]
    # The decoder part is the same computation in both paths; pooling its timings over both removes most of the
    # noise a busy machine puts into the ratio of two 5-step medians.
    pooled = _common.summarize(parts["cached"]["decoder"] + parts["recomputed"]["decoder"])["median"]
    result["decoder_pooled_s"] = pooled
    result["speedup_pooled"] = (result["recomputed_data_s"] + pooled) / (result["cached_data_s"] + pooled)
    for path in trainers:
        per_image = result[f"{path}_step_s"] / args.batch
        result[f"{path}_s_per_image"] = per_image
        result[f"{path}_epoch_s"] = per_image * PAPER_TRAIN_IMAGES
        result[f"{path}_candidate_h"] = per_image * PAPER_TRAIN_IMAGES * PAPER_EPOCHS / 3600.0
    for level in LEVELS:
        del cache[level]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,resnet50", help="comma-separated backbone names")
    parser.add_argument("--size", type=int, default=384, help="square crop side (paper: 384)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (paper: 200; CPU: 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first (default 2)")
    parser.add_argument("--width", type=int, default=64, help="decoder width (paper's proxy: 64)")
    parser.add_argument("--arch", default="nas-fcos", help="decoder genotype preset (default nas-fcos)")
    parser.add_argument("--num-classes", type=int, default=20, help="classes (VOC: 20)")
    _common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup, args.width = 64, 2, 1, 1, 16
        if args.backbones == "resnet18,resnet50":
            args.backbones = "resnet18"
    args.backbones = tuple(b.strip() for b in args.backbones.split(",") if b.strip())
    for flag in ("size", "batch", "steps", "width", "num_classes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected a positive integer")
    if args.warmup < 0:
        parser.error("--warmup: expected >= 0")
    return args


def to_markdown(record: dict[str, Any]) -> str:
    s = record["settings"]
    title = (f"### Decoder training on cached features vs recomputed frozen backbone "
             f"({s['arch']} decoder @{s['width']}, {s['size']}x{s['size']} crops, batch {s['batch']})")
    headers = ["backbone", "cached s/step", "(read)", "(decoder)", "recomputed s/step", "(backbone)", "(decoder)",
               "recomputed / cached", "(decoder pooled)", f"cached epoch s ({PAPER_TRAIN_IMAGES} img)",
               f"recomputed epoch s ({PAPER_TRAIN_IMAGES} img)", "cache MB/img", "backbone GMACs/img",
               "decoder GMACs/img (fwd)"]
    rows = [[r["backbone"], r["cached_step_s"], r["cached_data_s"], r["cached_decoder_s"], r["recomputed_step_s"],
             r["recomputed_data_s"], r["recomputed_decoder_s"], r["speedup"], r["speedup_pooled"], r["cached_epoch_s"],
             r["recomputed_epoch_s"], r["cache_mb_per_image"], r["backbone_gmacs"], r["decoder_gmacs"]]
            for r in record["results"]]
    return _common.markdown_report(record, title, _common.markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = _common.set_threads(args.threads)
    started = time.perf_counter()
    settings = {"backbones": list(args.backbones), "size": args.size, "batch": args.batch, "steps": args.steps,
                "warmup": args.warmup, "width": args.width, "arch": args.arch, "num_classes": args.num_classes,
                "threads": threads, "quick": args.quick, "cache_dtype": "float16", "optimizer": "Adam lr 8e-4",
                "polyak_decay": 0.9, "paper_train_images": PAPER_TRAIN_IMAGES, "paper_batch": PAPER_BATCH,
                "paper_epochs": PAPER_EPOCHS}
    record = _common.start_record(NAME, settings, threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="nasfcos-bench-cache-") as tmp:
        for name in args.backbones:
            results.append(measure_backbone(name, args, Path(tmp)))
            r = results[-1]
            print(f"  {name}: cached {r['cached_step_s']:.3f} s/step, recomputed {r['recomputed_step_s']:.3f} "
                  f"s/step ({r['speedup']:.2f}x)", flush=True)
    record["results"] = results
    record["notes"] += [
        "s/step = median seconds per training step (batch as above); (read)/(backbone) and (decoder) are the "
        "medians of the two parts of the step. recomputed / cached = ratio of the step medians; (decoder pooled) "
        "= (backbone + d) / (read + d) with d the median decoder time over both paths' steps (the same work), "
        "the less noisy estimate on a busy machine.",
        f"epoch s = seconds per image x {PAPER_TRAIN_IMAGES} (the paper's meta-train set; {PAPER_TRAIN_IMAGES // PAPER_BATCH} "
        f"steps of batch {PAPER_BATCH}), assuming the time per image does not depend on the batch size; one "
        f"proxy candidate trains {PAPER_EPOCHS} such epochs (see *_candidate_h in the JSON).",
        "Not counted (all favour the cache): image decoding/cropping, target assignment (precomputed for both), "
        "disk reads (the .npy files are in the page cache).",
        "Random weights; the backbone is frozen (eval, frozen BN, no_grad); both paths train their own decoder "
        "from the same seed; steps alternate between the paths.",
    ]
    return _common.conclude(record, started, to_markdown, args.out_dir, robust='the ratio is more robust (steps alternate)')


if __name__ == "__main__":
    main()
