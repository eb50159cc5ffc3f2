"""Proxy-task throughput on this machine: candidates per hour, images per second, achieved vs peak GFLOP/s.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/proxy_throughput.py [--config configs/proxy-cpu.yaml]
        [--set epochs=4 ...] [--genotypes 4] [--images 96] [--image-size 160] [--crop 128] [--threads N] [--quick]

What it does, in one run:

1. loads the proxy preset (``configs/proxy-cpu.yaml``; a file with a ``proxy:`` section such as
   ``configs/search-cpu.yaml`` works too) and applies ``--set`` overrides;
2. makes a small synthetic set (:func:`nasfcos.data.synthetic.make_synthetic`) and caches its ResNet-18
   features (:func:`nasfcos.data.cache.build_cache`, 75 % meta-train / 25 % meta-val) in a temporary folder;
3. samples ``--genotypes`` architectures (``SearchSpace().sample(random.Random(seed))``) and runs
   :func:`nasfcos.search.proxy.evaluate_candidate` on each, genotype by genotype, in these modes:

   - ``full``: early stopping off — every epoch of the preset;
   - ``one-epoch``: early stopping off, ``epochs=1``; ``(full - one-epoch) / (epochs - 1)`` is the time of one
     training epoch without set-up and validation, which gives the **training images/s**;
   - ``early-stop, kept``: early stopping on with a reference that never prunes: the cost of the extra
     validation at ``early_stop_epoch``;
   - ``early-stop, pruned``: early stopping on with a reference that prunes every candidate: the cost of a
     candidate stopped after ``early_stop_epoch``.

   One untimed ``epochs=1`` candidate runs first (it loads the cache into memory once per process, as a search
   worker does). A search with early stopping lies between the last two modes: with a fraction ``p`` of
   candidates pruned, candidates/hour = ``3600 / ((1 - p) t_kept + p t_pruned)``.
4. measures this machine's peak in the same run and at the same thread count: a ``--matmul``-cubed fp32
   matmul (``2 n^3`` FLOPs) and a 3x3 convolution (batch 8, 64 -> 64 channels, 96 x 96, padding 1:
   ``2 x 8 x 64 x 64 x 9 x 96 x 96`` FLOPs), forward only, 10 calls after 2 warm-ups; the peak is the
   fastest call (the median is kept in the JSON as ``gflops_median``).

Achieved GFLOP/s during proxy training = decoder GMACs per image (``EvaluationResult.gmacs``: the decoder on one
image of the cached feature size) x 3 (forward + backward: the backward pass of a convolution costs about two
forwards, one for the input gradient and one for the weight gradient — the usual convention) x 2 FLOPs per MAC
x training images/s. Normalisation, activations, the losses, Adam and Polyak are not counted (they are
memory-bound), so this is the useful-FLOP rate; its fraction of the measured peaks says how far the proxy's
small, thin convolutions are from what the cores can do.

Candidates per hour are for **one** worker at the preset's thread count; the CPU search config
(``configs/search-cpu.yaml``) runs ``workers`` such processes side by side.
"""

from __future__ import annotations

import argparse
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

NAME = "proxy_throughput"
MODES = ("full", "one-epoch", "early-stop-kept", "early-stop-pruned")
CONV_SHAPE = {"batch": 8, "in_channels": 64, "out_channels": 64, "height": 96, "width": 96, "kernel": 3}
QUICK_CONV_SHAPE = {"batch": 1, "in_channels": 16, "out_channels": 16, "height": 32, "width": 32, "kernel": 3}


def default_config_path() -> Path:
    """``configs/proxy-cpu.yaml``, else the ``proxy:`` section of ``configs/search-cpu.yaml``."""
    preferred = _common.ROOT / "configs" / "proxy-cpu.yaml"
    return preferred if preferred.is_file() else _common.ROOT / "configs" / "search-cpu.yaml"


def load_proxy_config(path: str | Path, overrides: list[str]) -> Any:
    """A :class:`ProxyConfig` from a proxy file or from the ``proxy:`` section of a search file."""
    import yaml

    from nasfcos.config import apply_overrides, config_from_dict, load_config
    from nasfcos.errors import UserError
    from nasfcos.search.proxy import ProxyConfig

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if isinstance(data, dict) and isinstance(data.get("proxy"), dict):
        cfg = config_from_dict(ProxyConfig, data["proxy"], source=f"{path} (proxy section)")
        return apply_overrides(cfg, overrides)
    return load_config(ProxyConfig, path, overrides)


def forced_reference(cfg: Any, prune: bool) -> Any:
    """An early-stop reference that is ready and prunes every candidate (``prune``) or none."""
    from nasfcos.search.proxy import EarlyStopReference

    reference = EarlyStopReference.for_config(cfg)
    value = 1e-30 if prune else 1e30
    names = {f.name for f in dataclasses.fields(reference)}
    for name in names:
        if name in ("count",):
            setattr(reference, name, 10**6)
        elif name in ("average", "best", "mean"):
            setattr(reference, name, value)
        elif name in ("std", "variance", "var"):
            setattr(reference, name, 0.0)
    decision = reference.should_stop(1.0, cfg.early_stop_margin, cfg.early_stop_min_samples)
    if decision != prune:
        raise RuntimeError("could not build a forced early-stop reference for this proxy version")
    return reference


def run_candidate(genotype: Any, cache: Any, cfg: Any, seed: int, reference: Any = None) -> dict[str, Any]:
    from nasfcos.search.proxy import evaluate_candidate

    result = evaluate_candidate(genotype, cache, cfg, seed=seed, early_stop_reference=reference)
    if result.status == "failed":
        raise RuntimeError(f"proxy candidate failed: {result.error}")
    return {"status": result.status, "wall_s": float(result.wall_time_s), "epochs_run": int(result.epochs_run),
            "gmacs": result.gmacs, "params": result.params, "reward": result.reward}


def _peak(flops: float, times: list[float]) -> dict[str, Any]:
    """A peak is the best the machine did: GFLOP/s from the fastest call (the median too, for reference)."""
    median, best = statistics.median(times), min(times)
    return {"gflop": flops / 1e9, "median_s": median, "min_s": best, "gflops": flops / best / 1e9,
            "gflops_median": flops / median / 1e9}


def peak_matmul(n: int, warmup: int = 2, repeats: int = 10) -> dict[str, Any]:
    """fp32 ``n x n @ n x n`` GFLOP/s."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    with torch.inference_mode():
        times = _common.time_calls(lambda: torch.mm(a, b), warmup=warmup, repeats=repeats)
    return {"n": n, **_peak(2.0 * n**3, times)}


def peak_conv(shape: dict[str, int], warmup: int = 2, repeats: int = 10) -> dict[str, Any]:
    """fp32 3x3 convolution (padding 1) GFLOP/s, forward only."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    k = shape["kernel"]
    x = torch.randn(shape["batch"], shape["in_channels"], shape["height"], shape["width"], generator=generator)
    w = torch.randn(shape["out_channels"], shape["in_channels"], k, k, generator=generator)
    flops = 2.0 * shape["batch"] * shape["out_channels"] * shape["in_channels"] * k * k * shape["height"] * shape["width"]
    with torch.inference_mode():
        times = _common.time_calls(lambda: F.conv2d(x, w, padding=k // 2), warmup=warmup, repeats=repeats)
    return {**shape, **_peak(flops, times)}


def make_cache(workdir: Path, args: argparse.Namespace, cfg: Any, threads: int | None, device: str = "cpu") -> Any:
    """Synthetic set (``args.images`` at ``args.image_size``) -> ``args.backbone`` feature cache at ``args.crop``."""
    from nasfcos.data.cache import build_cache
    from nasfcos.data.synthetic import make_synthetic, read_synthetic

    info = make_synthetic(workdir / "synth", seed=args.seed, num_train=args.images, num_val=0,
                          image_size=args.image_size)
    dataset = read_synthetic(info, "train")
    return build_cache(dataset, workdir / "cache", backbone=args.backbone, crop=args.crop, meta_train=0.75,
                       seed=args.seed, batch_size=16, device=device, threads=threads, fcos=cfg.fcos,
                       progress=False)


def measure(args: argparse.Namespace, cfg: Any, threads: int, workdir: Path) -> dict[str, Any]:
    from nasfcos.space.search_space import SearchSpace

    cache = make_cache(workdir, args, cfg, threads)
    n_train = len(cache.split("train"))
    n_val = len(cache.split("val"))
    space = SearchSpace()
    rng = random.Random(args.seed)
    genotypes = [space.sample(rng) for _ in range(args.genotypes)]

    base = dataclasses.replace(cfg, threads=threads, device="cpu")
    configs = {
        "full": dataclasses.replace(base, early_stop=False),
        "one-epoch": dataclasses.replace(base, early_stop=False, epochs=1),
    }
    early_stop_possible = base.epochs > base.early_stop_epoch
    if early_stop_possible:
        configs["early-stop-kept"] = dataclasses.replace(base, early_stop=True)
        configs["early-stop-pruned"] = dataclasses.replace(base, early_stop=True)
    references = {"early-stop-kept": False, "early-stop-pruned": True}

    run_candidate(genotypes[0], cache, configs["one-epoch"], seed=args.seed)  # warm-up: loads the cache once
    runs: list[dict[str, Any]] = []
    for index, genotype in enumerate(genotypes):
        for mode, mode_cfg in configs.items():
            reference = forced_reference(mode_cfg, references[mode]) if mode in references else None
            row = run_candidate(genotype, cache, mode_cfg, seed=args.seed + index, reference=reference)
            row.update({"genotype": index, "key": genotype.key()[:12], "mode": mode})
            runs.append(row)
        print(f"  genotype {index}: " + ", ".join(f"{r['mode']} {r['wall_s']:.2f} s ({r['status']})"
                                                 for r in runs if r["genotype"] == index), flush=True)

    per_genotype = []
    for index in range(len(genotypes)):
        by_mode = {r["mode"]: r for r in runs if r["genotype"] == index}
        full, one = by_mode["full"], by_mode["one-epoch"]
        epoch_s = (full["wall_s"] - one["wall_s"]) / (base.epochs - 1) if base.epochs > 1 else None
        train_img_s = n_train / epoch_s if epoch_s and epoch_s > 0 else None
        gmacs = full["gmacs"]
        achieved = gmacs * 3 * 2 * train_img_s if (gmacs and train_img_s) else None
        per_genotype.append({"genotype": index, "key": full["key"], "gmacs_per_image": gmacs,
                             "params": full["params"], "train_epoch_s": epoch_s, "train_images_per_s": train_img_s,
                             "achieved_gflops": achieved})

    modes = []
    for mode in configs:
        rows = [r for r in runs if r["mode"] == mode]
        wall = statistics.median(r["wall_s"] for r in rows)
        images = statistics.median(n_train * r["epochs_run"] / r["wall_s"] for r in rows)
        modes.append({"mode": mode, "candidate_s": wall, "candidates_per_hour": 3600.0 / wall,
                      "train_images_per_s_end_to_end": images,
                      "epochs_run": statistics.median_low(r["epochs_run"] for r in rows),
                      "pruned": sum(r["status"] == "pruned" for r in rows), "candidates": len(rows)})
    return {"cache": {"train_images": n_train, "val_images": n_val, "crop": cache.crop,
                      "backbone": args.backbone, "feature_shapes": {k: list(v) for k, v in cache.feature_shapes.items()},
                      "build_s": getattr(cache, "seconds", None)},
            "runs": runs, "per_genotype": per_genotype, "modes": modes, "early_stop_possible": early_stop_possible}


def _median_or_none(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="proxy preset (default configs/proxy-cpu.yaml, else configs/search-cpu.yaml's proxy section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="ProxyConfig override, e.g. --set epochs=4 (repeatable)")
    parser.add_argument("--genotypes", type=int, default=4, help="sampled architectures (default 4)")
    parser.add_argument("--images", type=int, default=96, help="synthetic images to cache (75 %% meta-train)")
    parser.add_argument("--image-size", type=int, default=160, help="synthetic image side (default 160)")
    parser.add_argument("--crop", type=int, default=128, help="cache crop (default 128, as proxy-cpu.yaml expects)")
    parser.add_argument("--backbone", default="resnet18", help="cache backbone (default resnet18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul", type=int, default=2048, help="matmul side for the peak (default 2048)")
    _common.add_common_arguments(parser, threads=None)
    args = parser.parse_args(argv)
    args.conv_shape = dict(CONV_SHAPE)
    if args.quick:
        args.genotypes, args.images, args.image_size, args.crop, args.matmul = 1, 8, 64, 64, 256
        args.conv_shape = dict(QUICK_CONV_SHAPE)
        args.overrides = ["epochs=2", "early_stop_epoch=1", "batch_size=3", "width=8", *args.overrides]
    for flag in ("genotypes", "images", "matmul"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected a positive integer")
    if args.images < 4:
        parser.error("--images: expected at least 4 (meta-train and meta-val each need images)")
    return args


def to_markdown(record: dict[str, Any]) -> str:
    s = record["settings"]
    cache = record["cache"]
    title = (f"### Proxy throughput ({s['config']}: width {s['proxy']['width']}, {s['proxy']['epochs']} epochs, "
             f"batch {s['proxy']['batch_size']}; {cache['backbone']} cache {cache['crop']}x{cache['crop']}, "
             f"{cache['train_images']} meta-train / {cache['val_images']} meta-val images; "
             f"{s['genotypes']} sampled genotypes, {s['threads']} thread(s))")
    rows = [[m["mode"], m["candidate_s"], m["candidates_per_hour"], m["train_images_per_s_end_to_end"],
             m["epochs_run"], f"{m['pruned']}/{m['candidates']}"] for m in record["modes"]]
    modes = _common.markdown_table(["mode", "s / candidate", "candidates / hour", "train img/s (end to end)",
                                    "epochs run", "pruned"], rows)
    summary = record["summary"]
    peak = _common.markdown_table(
        ["training images/s (marginal epoch)", "decoder GMACs / image", "achieved GFLOP/s (x3 fwd+bwd, x2)",
         "peak matmul GFLOP/s", "peak 3x3 conv GFLOP/s", "fraction of matmul peak", "fraction of conv peak"],
        [[summary["train_images_per_s"], summary["gmacs_per_image"], summary["achieved_gflops"],
          record["peak"]["matmul"]["gflops"], record["peak"]["conv3x3"]["gflops"],
          summary["fraction_of_matmul_peak"], summary["fraction_of_conv_peak"]]])
    per_genotype = _common.markdown_table(
        ["genotype", "key", "GMACs / image", "params", "train epoch s", "train img/s", "achieved GFLOP/s"],
        [[g["genotype"], g["key"], g["gmacs_per_image"], g["params"], g["train_epoch_s"], g["train_images_per_s"],
          g["achieved_gflops"]] for g in record["per_genotype"]])
    return _common.markdown_report(record, title, modes, peak, "Per genotype:", per_genotype)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from nasfcos.config import config_to_dict

    config_path = Path(args.config) if args.config else default_config_path()
    cfg = load_proxy_config(config_path, args.overrides)
    threads = args.threads if args.threads is not None else (cfg.threads or 2)
    threads = _common.set_threads(threads)
    shown_path = _common.display_path(config_path)
    started = time.perf_counter()
    settings = {"config": shown_path, "overrides": list(args.overrides), "proxy": config_to_dict(cfg),
                "genotypes": args.genotypes, "images": args.images, "image_size": args.image_size, "crop": args.crop,
                "backbone": args.backbone, "seed": args.seed, "threads": threads, "matmul_n": args.matmul,
                "conv_shape": args.conv_shape, "quick": args.quick, "flop_convention": "MACs x 3 (fwd+bwd) x 2"}
    record = _common.start_record(NAME, settings, threads)
    with tempfile.TemporaryDirectory(prefix="nasfcos-bench-proxy-") as tmp:
        measured = measure(args, cfg, threads, Path(tmp))
    record.update(measured)
    record["peak"] = {"matmul": peak_matmul(args.matmul), "conv3x3": peak_conv(args.conv_shape)}
    achieved = _median_or_none([g["achieved_gflops"] for g in record["per_genotype"]])
    record["summary"] = {
        "train_images_per_s": _median_or_none([g["train_images_per_s"] for g in record["per_genotype"]]),
        "gmacs_per_image": _median_or_none([g["gmacs_per_image"] for g in record["per_genotype"]]),
        "achieved_gflops": achieved,
        "fraction_of_matmul_peak": achieved / record["peak"]["matmul"]["gflops"] if achieved else None,
        "fraction_of_conv_peak": achieved / record["peak"]["conv3x3"]["gflops"] if achieved else None,
        "candidates_per_hour_no_early_stop": next(m["candidates_per_hour"] for m in record["modes"] if m["mode"] == "full"),
    }
    record["notes"] += [
        "s / candidate: median over the genotypes of evaluate_candidate's wall time (decoder build, cost count, "
        "training, validation). train img/s (end to end) = meta-train images x epochs run / wall time.",
        "training images/s (marginal epoch) = meta-train images / ((t_full - t_one_epoch) / (epochs - 1)); "
        "achieved GFLOP/s = decoder GMACs per image x 3 (forward + backward ~ 3 forwards) x 2 FLOPs/MAC x that "
        "rate; medians over the genotypes. Peaks (fastest of 10 calls) measured in the same run at the same "
        "thread count.",
        "With early stopping and a fraction p of candidates pruned: candidates/hour = 3600 / ((1 - p) * "
        "t_kept + p * t_pruned), between the 'early-stop-kept' and 'early-stop-pruned' rows.",
        "One worker; the CPU search config runs `workers` processes side by side.",
    ]
    if not measured["early_stop_possible"]:
        record["notes"].append("early_stop_epoch >= epochs: early stopping cannot change anything, not measured.")
    return _common.conclude(record, started, to_markdown, args.out_dir, robust='')


if __name__ == "__main__":
    main()
