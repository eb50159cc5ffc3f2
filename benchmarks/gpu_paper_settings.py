"""GPU figures at the paper's settings: proxy seconds per candidate, and NAS-FCOS@128-R50 latency vs the paper.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/gpu_paper_settings.py [--amp] [--channels-last]
        [--sizes 600,800,1000] [--repeats 50] [--warmup 10] [--images 800] [--genotypes 2] [--skip-proxy]

Without a CUDA device it prints ``skipped: no CUDA device``, writes a JSON saying so and exits 0.

1. **Proxy task** (paper Sec. 4.1; ``configs/proxy-paper.yaml``: width 64, batch 200, 15 epochs, Adam 8e-4,
   Polyak 0.9) on ResNet-50 features of 384 x 384 crops. A cache of the paper's 4000 + 1715 VOC images is
   ~50 GB, so a synthetic set of ``--images`` images (75 % meta-train) is cached instead and the paper-scale
   time is extrapolated: for each genotype (the ``nas-fcos`` preset, then ``--genotypes - 1`` sampled ones)
   the candidate runs with all epochs (``t_full``) and with one epoch (``t_one``), early stopping off;
   ``epoch = (t_full - t_one) / (epochs - 1)`` is one training epoch, and

   ``paper estimate = epochs x epoch x 4000 / n_train + (t_full - epochs x epoch) x 1715 / n_val``

   (training scales with the meta-train images; the rest — set-up plus the final validation — is scaled with
   the meta-val images, which over-states the fixed set-up part).
2. **Latency**: ``nasfcos.build_detector("nas-fcos@128", backbone="resnet50")`` with ``min_size = max_size =
   S`` on one random ``S x S`` image already on the GPU, batch 1, eval, ``torch.no_grad``, random
   weights, post-processing included; ``torch.backends.cudnn.benchmark = True``; ``--warmup`` untimed calls,
   then ``--repeats`` calls each between two ``torch.cuda.synchronize()``; median and p90. Next to the paper's
   37 / 39 / 50 ms at 600 / 800 / 1000 on one V100 (FACTS 6), with ``fpn-fcos`` R-50 at 800 for the official
   FCOS R-50's ~45 ms. ``--amp`` runs the network under ``torch.autocast(float16)`` (the paper's numbers are
   fp32 as far as it says).

``--device cpu`` runs the same code on the CPU (with ``--quick``: tiny sizes) so the script can be checked on
a machine without a GPU; those numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import proxy_throughput  # noqa: E402

NAME = "gpu_paper_settings"
PAPER_LATENCY_MS = {600: 37.0, 800: 39.0, 1000: 50.0}  # NAS-FCOS@128-R50, one V100 (FACTS 6)
FCOS_R50_V100_MS = 45.0  # official FCOS R-50 on a V100, post-processing included (FACTS 6)
PAPER_TRAIN, PAPER_VAL = 4000, 1715


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the code path")
    parser.add_argument("--amp", action="store_true", help="latency under torch.autocast(float16)")
    parser.add_argument("--channels-last", action="store_true", help="latency models in channels_last")
    parser.add_argument("--sizes", default="600,800,1000", help="square latency sizes (default 600,800,1000)")
    parser.add_argument("--arch", default="nas-fcos@128", help="latency architecture (default nas-fcos@128)")
    parser.add_argument("--backbone", default="resnet50", help="backbone for latency and the cache")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--config", default=str(_common.ROOT / "configs" / "proxy-paper.yaml"),
                        help="proxy preset (default configs/proxy-paper.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="ProxyConfig override (repeatable)")
    parser.add_argument("--images", type=int, default=800, help="synthetic images to cache (75 %% meta-train)")
    parser.add_argument("--image-size", type=int, default=512, help="synthetic image side")
    parser.add_argument("--crop", type=int, default=384, help="cache crop (paper: 384)")
    parser.add_argument("--genotypes", type=int, default=2, help="nas-fcos + N-1 sampled genotypes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-proxy", action="store_true", help="latency only")
    parser.add_argument("--skip-latency", action="store_true", help="proxy only")
    _common.add_common_arguments(parser, threads=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup = "64", 2, 1
        args.images, args.image_size, args.crop, args.genotypes = 8, 64, 64, 1
        if args.backbone == "resnet50":
            args.backbone = "resnet18"
        args.overrides = ["epochs=2", "batch_size=3", "width=8", *args.overrides]
    args.sizes = tuple(int(s) for s in str(args.sizes).split(",") if s.strip())
    if args.repeats < 1 or args.warmup < 0 or args.genotypes < 1 or args.images < 4:
        parser.error("--repeats >= 1, --warmup >= 0, --genotypes >= 1 and --images >= 4 expected")
    return args


def device_available(device: str) -> bool:
    import torch

    if device == "cpu":
        return True
    return device.startswith("cuda") and torch.cuda.is_available()


def synchronizer(device: Any) -> Any:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def measure_latency(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    import torch

    import nasfcos

    rows = []
    plan = [(args.arch, size) for size in args.sizes]
    if not args.quick:
        plan.append(("fpn-fcos", 800))
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.float16)) if args.amp else contextlib.nullcontext
    for arch, size in plan:
        torch.manual_seed(0)
        model = nasfcos.build_detector(arch, backbone=args.backbone, num_classes=80, min_size=size, max_size=size)
        model = model.to(device).eval()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), autocast():
            times = _common.time_calls(lambda: model([image]), warmup=args.warmup, repeats=args.repeats,
                                       synchronize=synchronizer(device))
            boxes = int(model([image])[0]["boxes"].shape[0])
        stats = _common.summarize([t * 1000.0 for t in times])
        if arch == args.arch and args.backbone == "resnet50" and arch == "nas-fcos@128":
            paper = PAPER_LATENCY_MS.get(size)
        elif arch == "fpn-fcos" and args.backbone == "resnet50" and size == 800:
            paper = FCOS_R50_V100_MS
        else:
            paper = None
        rows.append({"arch": arch, "backbone": args.backbone, "size": size, "median_ms": stats["median"],
                     "p90_ms": stats["p90"], "repeats": stats["n"], "boxes": boxes, "paper_v100_ms": paper,
                     "ratio_to_paper": stats["median"] / paper if paper else None})
        print(f"  {arch} {size}: {stats['median']:.1f} ms", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure_proxy(args: argparse.Namespace, device: Any, workdir: Path) -> dict[str, Any]:
    from nasfcos.space.presets import get_preset
    from nasfcos.space.search_space import SearchSpace

    cfg = proxy_throughput.load_proxy_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, device=str(device), early_stop=False)
    start = time.perf_counter()
    cache = proxy_throughput.make_cache(workdir, args, cfg, threads=None, device=str(device))
    cache_s = time.perf_counter() - start
    n_train, n_val = len(cache.split("train")), len(cache.split("val"))
    rng = random.Random(args.seed)
    space = SearchSpace()
    genotypes = [("nas-fcos", get_preset("nas-fcos").genotype)]
    genotypes += [(f"sampled-{i}", space.sample(rng)) for i in range(1, args.genotypes)]
    one_cfg = dataclasses.replace(cfg, epochs=1)
    proxy_throughput.run_candidate(genotypes[0][1], cache, one_cfg, seed=args.seed)  # warm-up: preload, cuDNN
    rows = []
    for index, (label, genotype) in enumerate(genotypes):
        full = proxy_throughput.run_candidate(genotype, cache, cfg, seed=args.seed + index)
        one = proxy_throughput.run_candidate(genotype, cache, one_cfg, seed=args.seed + index)
        epoch_s = (full["wall_s"] - one["wall_s"]) / (cfg.epochs - 1) if cfg.epochs > 1 else None
        if epoch_s is not None and epoch_s > 0:
            rest = max(0.0, full["wall_s"] - cfg.epochs * epoch_s)
            estimate = cfg.epochs * epoch_s * PAPER_TRAIN / n_train + rest * PAPER_VAL / n_val
        else:
            estimate = None
        rows.append({"genotype": label, "key": genotype.key()[:12], "gmacs_per_image": full["gmacs"],
                     "candidate_s": full["wall_s"], "one_epoch_candidate_s": one["wall_s"], "train_epoch_s": epoch_s,
                     "train_images_per_s": n_train / epoch_s if epoch_s and epoch_s > 0 else None,
                     "paper_scale_candidate_s": estimate})
        print(f"  proxy {label}: {full['wall_s']:.1f} s on {n_train} images, estimate at paper scale "
              f"{estimate if estimate is None else round(estimate, 1)} s", flush=True)
    from nasfcos.config import config_to_dict

    return {"proxy_config": config_to_dict(cfg), "cache": {"train_images": n_train, "val_images": n_val,
            "crop": cache.crop, "backbone": args.backbone, "build_s": cache_s}, "proxy": rows}


def to_markdown(record: dict[str, Any]) -> str:
    lines = ["### GPU at the paper's settings", "", _common.machine_line(record["machine"], record["load"]), ""]
    if record.get("skipped"):
        lines.append(f"skipped: {record['reason']}")
        return "\n".join(lines)
    if record.get("proxy"):
        c = record["cache"]
        p = record["proxy_config"]
        lines += [f"Proxy (width {p['width']}, batch {p['batch_size']}, {p['epochs']} epochs, {c['backbone']} "
                  f"{c['crop']}x{c['crop']} cache of {c['train_images']} / {c['val_images']} images):", "",
                  _common.markdown_table(
                      ["genotype", "GMACs / image", f"s / candidate ({c['train_images']} img)", "train epoch s",
                       "train img/s", f"est. s / candidate ({PAPER_TRAIN} / {PAPER_VAL} img)"],
                      [[r["genotype"], r["gmacs_per_image"], r["candidate_s"], r["train_epoch_s"],
                        r["train_images_per_s"], r["paper_scale_candidate_s"]] for r in record["proxy"]]), ""]
    if record.get("latency"):
        lines += ["Latency (batch 1, post-processing included" + (", AMP fp16" if record["settings"]["amp"] else "")
                  + "):", "", _common.markdown_table(
                      ["arch", "backbone", "size", "median ms", "p90 ms", "paper V100 ms", "ratio", "boxes"],
                      [[r["arch"], r["backbone"], f"{r['size']}x{r['size']}", r["median_ms"], r["p90_ms"],
                        r["paper_v100_ms"], r["ratio_to_paper"], r["boxes"]] for r in record["latency"]])]
    lines += ["", *[f"- {note}" for note in record["notes"]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    threads = _common.set_threads(args.threads)
    settings = {"device": args.device, "amp": args.amp, "channels_last": args.channels_last,
                "sizes": list(args.sizes), "arch": args.arch, "backbone": args.backbone, "repeats": args.repeats,
                "warmup": args.warmup, "images": args.images, "crop": args.crop, "genotypes": args.genotypes,
                "config": _common.display_path(args.config), "overrides": list(args.overrides), "quick": args.quick,
                "cudnn_benchmark": True}
    record = _common.start_record(NAME, settings, threads)
    started = time.perf_counter()
    if not device_available(args.device):
        record.update({"skipped": True, "reason": "no CUDA device"})
        print("skipped: no CUDA device")
    else:
        device = torch.device(args.device)
        record["skipped"] = False
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            record["machine"]["cuda_device"] = torch.cuda.get_device_name(device)
            record["machine"]["cuda_runtime"] = torch.version.cuda
        else:
            record["notes"].append("Run on the CPU to check the code path: these numbers say nothing about GPUs.")
        if not args.skip_proxy:
            with tempfile.TemporaryDirectory(prefix="nasfcos-bench-gpu-") as tmp:
                record.update(measure_proxy(args, device, Path(tmp)))
        if not args.skip_latency:
            record["latency"] = measure_latency(args, device)
        record["notes"] += [
            "Random weights. Latency: one random image already on the device, min_size = max_size = size (no "
            "resize), eval + no_grad, cudnn.benchmark, synchronize around every timed call.",
            "Paper: NAS-FCOS@128-R50 37 / 39 / 50 ms at 600 / 800 / 1000 on one V100; official FCOS R-50 ~45 ms "
            "(FACTS 6). Different GPU generation: compare the shape of the curve, not the absolute ms.",
            "Proxy: synthetic images, random-init backbone features; paper-scale seconds extrapolated as in the "
            "script's docstring (early stopping off).",
        ]
    _common.finish_record(record, started)
    markdown = to_markdown(record)
    paths = _common.write_outputs(record, markdown, args.out_dir)
    _common.report(markdown, paths)
    return record


if __name__ == "__main__":
    main()
