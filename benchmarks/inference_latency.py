"""CPU inference latency of nasfcos detectors next to torchvision's FCOS, post-processing included.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/inference_latency.py [--size 800] [--threads 2] [--repeats 10]
        [--warmup 2] [--models torchvision-fcos,fpn-fcos,...] [--variants default,full-nms] [--quick]

What is timed: ``model([image])`` in eval mode under ``torch.no_grad`` for one random ``3 x S x S`` image
in ``[0, 1]`` (the same tensor for every model), random weights, batch 1 — i.e. normalisation, padding, the
network and post-processing (threshold, top-k, decode, NMS), as a user calls it. Every model is built first and
warmed up (``--warmup`` untimed calls per model and variant); then the ``--repeats`` timed calls go
round-robin over all (model, variant) pairs, so a burst of background load hits every row alike. Median and
p90 (nearest rank) per row.

Models (all ResNet-50, built without pretrained weights):

- ``torchvision-fcos``: ``torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
  num_classes=91, min_size=S, max_size=S)`` — the reference; every ratio is ours / this.
- ``fpn-fcos``: ``nasfcos.build_detector("fpn-fcos", backbone="resnet50", num_classes=80, min_size=S,
  max_size=S)`` — the same architecture family (hand-designed FPN + 4-conv GN head).
- ``nas-fcos@256`` (= ``nas-fcos``), ``nas-fcos@128``, ``nas-fcos@128-256``, ``nas-fcos-fpn``: the paper's models.

Same input, no resizing: with ``min_size = max_size = S`` and an ``S x S`` input both transforms keep the size.
nasfcos then skips interpolation; torchvision's ``GeneralizedRCNNTransform`` would still run a bilinear
interpolation at scale 1.0, so its ``resize`` is replaced by the identity on this instance (both models then
normalise, pad to a multiple of 32 — a no-op at 800 — and run). torchvision builds its backbone with
``BatchNorm2d`` when no weights are given, nasfcos with ``FrozenBatchNorm2d``; in eval mode both are one
affine per channel. torchvision predicts 91 COCO ids, nasfcos 80 contiguous classes (the classification
convs differ by 14 %; < 1 % of the network's MACs).

Post-processing cost depends on how many candidates pass the score threshold, and random weights give almost
none (the classification prior is 0.01). Two variants, each reported with the number of boxes produced:

- ``default``: each library's own thresholds (torchvision ``score_thresh=0.2`` on ``sqrt(cls * ctr)``,
  nasfcos ``0.05`` on the class probability; both keep 1000 candidates per level, NMS 0.6, 100 detections);
- ``full-nms``: ``score_thresh = 0`` on both, so each level's top 1000 candidates are decoded and go through
  class-aware NMS — the worst-case post-processing work, equal for both libraries.

GMACs (batch 1, backbone + decoder, deformable convs counted) are counted on the meta device by
``nasfcos.analysis.profile`` (torchvision's model through its backbone + head).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "inference_latency"
TORCHVISION = "torchvision-fcos"
OUR_MODELS = {
    "fpn-fcos": "fpn-fcos",
    "nas-fcos@256": "nas-fcos",
    "nas-fcos@128": "nas-fcos@128",
    "nas-fcos@128-256": "nas-fcos@128-256",
    "nas-fcos-fpn": "nas-fcos-fpn",
}
ALL_MODELS = (TORCHVISION, *OUR_MODELS)
QUICK_MODELS = (TORCHVISION, "fpn-fcos", "nas-fcos@128")
VARIANTS = ("default", "full-nms")


def build_model(name: str, size: int) -> tuple[Any, Callable[[float], None]]:
    """``(model in eval mode, set_score_thresh)`` for one row."""
    import torch

    torch.manual_seed(0)
    if name == TORCHVISION:
        from torchvision.models.detection import fcos_resnet50_fpn

        model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size)
        model.transform.resize = lambda image, target=None: (image, target)  # same input size: no interpolation
        default_thresh = model.score_thresh

        def set_thresh(value: float | None) -> None:
            model.score_thresh = default_thresh if value is None else value
    else:
        import nasfcos

        model = nasfcos.build_detector(OUR_MODELS[name], backbone="resnet50", num_classes=80,
                                       min_size=size, max_size=size)
        default_thresh = model.score_thresh

        def set_thresh(value: float | None) -> None:
            model.score_thresh = default_thresh if value is None else value
    model.eval()
    return model, set_thresh


def count_gmacs(name: str, model: Any, size: int) -> float | None:
    """Backbone + decoder GMACs at ``size x size`` (batch 1), or ``None`` if counting fails."""
    from nasfcos.analysis.profile import profile

    try:
        if name == TORCHVISION:
            def forward(m: Any, x: Any) -> Any:
                return m.head(list(m.backbone(x).values()))

            return float(profile(model, (size, size), forward_fn=forward, meta=True)["gmacs"])
        return float(profile(model, (size, size), meta=True)["gmacs"])
    except Exception:  # noqa: BLE001 - a count is context, not the measurement
        return None


def measure_all(names: tuple[str, ...], size: int, warmup: int, repeats: int,
                variants: tuple[str, ...], gmacs: bool = True) -> list[dict[str, Any]]:
    """Latency rows for every (model, variant), timed **round-robin**: repeat ``r`` runs every pair once before
    repeat ``r + 1`` starts, so a change in background load hits all rows alike and the ratios stay fair."""
    import torch

    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    models = {}
    for name in names:
        model, set_thresh = build_model(name, size)
        models[name] = (model, set_thresh, count_gmacs(name, model, size) if gmacs else None)
    pairs = [(name, variant) for name in names for variant in variants]
    thresholds: dict[tuple[str, str], float] = {}

    def call(pair: tuple[str, str]) -> int:
        model, set_thresh, _ = models[pair[0]]
        set_thresh(0.0 if pair[1] == "full-nms" else None)
        thresholds[pair] = float(model.score_thresh)
        return int(model([image])[0]["boxes"].shape[0])  # deterministic: same weights, same image

    # no_grad, not inference_mode: the deformable conv updates tensors on its own worker threads, outside the
    # caller's (thread-local) inference mode.
    with torch.no_grad():
        stats, boxes = _common.time_round_robin({pair: partial(call, pair) for pair in pairs}, warmup=warmup,
                                                repeats=repeats)
    rows = []
    for pair, row in stats.items():
        rows.append({
            "model": pair[0],
            "variant": pair[1],
            "score_thresh": thresholds[pair],
            "median_ms": row["median"],
            "p90_ms": row["p90"],
            "min_ms": row["min"],
            "repeats": row["n"],
            "boxes": boxes[pair],
            "gmacs": models[pair[0]][2],
        })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=800, help="square input side in pixels (default 800)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model and variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help=f"comma-separated subset of: {', '.join(ALL_MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="default, full-nms or both")
    parser.add_argument("--skip-gmacs", action="store_true", help="do not count GMACs (saves seconds)")
    _common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.warmup = 128, 2, 1
        if args.models == ",".join(ALL_MODELS):
            args.models = ",".join(QUICK_MODELS)
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [m for m in args.models if m not in ALL_MODELS] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown model/variant {unknown[0]!r}")
    if args.size < 32 or args.size % 32:
        parser.error(f"--size: expected a multiple of 32 (got {args.size}) so that padding adds nothing")
    return args


def to_markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    title = f"### CPU inference latency, {settings['size']}x{settings['size']}, batch 1, post-processing included"
    headers = ["model (R-50)", "variant", "score thresh", "median ms", "p90 ms", "x torchvision FCOS", "boxes",
               "GMACs"]
    rows = [[r["model"], r["variant"], r["score_thresh"], r["median_ms"], r["p90_ms"], r.get("ratio_to_torchvision"),
             r["boxes"], r["gmacs"]] for r in record["results"]]
    return _common.markdown_report(record, title, _common.markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = _common.set_threads(args.threads)
    started = time.perf_counter()
    settings = {"size": args.size, "threads": threads, "warmup": args.warmup, "repeats": args.repeats,
                "models": list(args.models), "variants": list(args.variants), "batch": 1, "quick": args.quick,
                "weights": "random (torch.manual_seed(0))", "backbone": "resnet50"}
    record = _common.start_record(NAME, settings, threads)
    results = measure_all(args.models, args.size, args.warmup, args.repeats, args.variants,
                          gmacs=not args.skip_gmacs)
    reference = {r["variant"]: r["median_ms"] for r in results if r["model"] == TORCHVISION}
    for row in results:
        ref = reference.get(row["variant"])
        row["ratio_to_torchvision"] = row["median_ms"] / ref if ref else None
    record["results"] = results
    record["notes"] += [
        "Random weights; one random image in [0, 1]; eval mode, torch.no_grad; median/p90 of the timed "
        "calls after warm-up; models and variants timed round-robin (one call each per repeat).",
        "default = each library's own score threshold (torchvision 0.2 on sqrt(cls*ctr), nasfcos 0.05 on the "
        "class probability): random weights leave (almost) no candidates, so post-processing is nearly free. "
        "full-nms = score_thresh 0 for both: top 1000 candidates per level are decoded and go through NMS "
        "(worst case, same work for both).",
        "torchvision's resize is the identity here (input already at min_size = max_size); nasfcos skips "
        "resizing by itself at that size. torchvision predicts 91 COCO ids, nasfcos 80 classes.",
        "ratio = median / torchvision FCOS median of the same variant.",
    ]
    return _common.conclude(record, started, to_markdown, args.out_dir, robust='the ratios are more robust')


if __name__ == "__main__":
    main()
