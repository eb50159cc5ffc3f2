"""CPU latency of the exported ONNX file in ONNX Runtime vs the PyTorch detector in eager mode, and the file size.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/export_latency.py [--size 800] [--threads 1] [--repeats 5]
        [--warmup 1] [--models fpn-fcos,nas-fcos@128] [--quick]

What is timed, for one random ``3 x S x S`` image in ``[0, 1]`` (the same for every row), batch 1, random weights
(ResNet-50, 80 classes, ``min_size = max_size = S`` so that PyTorch does not resize):

- ``pytorch``: ``model([image])`` in eval mode under ``torch.no_grad`` — normalisation, padding, backbone,
  decoder (the native deformable-conv path) and post-processing with NMS, as a user calls it;
- ``onnxruntime``: ``session.run`` of the file ``nasfcos.export_onnx(model, path, size=(S, S))`` wrote — the
  same stages in one graph (deformable convs as ``GridSample`` + ``Conv``), on the ``CPUExecutionProvider`` with
  ``intra_op_num_threads`` = the torch thread count, ``inter_op_num_threads = 1``, all graph optimisations.

Both runtimes use the same number of threads. Every (model, runtime) pair is warmed up (``--warmup`` untimed
calls), then the ``--repeats`` timed calls go round-robin over all pairs, so a burst of background load hits every
row alike; median and p90 (nearest rank) per row. Random weights leave no candidates above the 0.05 score
threshold, so post-processing is nearly free in both (``benchmarks/inference_latency.py`` measures the
worst case for PyTorch). The export itself is timed once per model (wall seconds, including the file write;
``check=False``: correctness is what ``tests/test_export.py`` and ``nasfcos export`` check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "export_latency"
ALL_MODELS = ("fpn-fcos", "nas-fcos@128")
RUNTIMES = ("pytorch", "onnxruntime")


def build_model(arch: str, size: int, backbone: str, num_classes: int) -> Any:
    import torch

    import nasfcos

    torch.manual_seed(0)
    model = nasfcos.build_detector(arch, backbone=backbone, num_classes=num_classes, min_size=size, max_size=size)
    return model.eval()


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _node_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def measure_all(models: tuple[str, ...], size: int, warmup: int, repeats: int, threads: int, backbone: str,
                num_classes: int, folder: Path) -> list[dict[str, Any]]:
    """Export every model, then time every (model, runtime) pair round-robin."""
    import torch

    from nasfcos.export import export_onnx

    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    feed = image[None].numpy()
    calls: dict[tuple[str, str], Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for arch in models:
        model = build_model(arch, size, backbone, num_classes)
        path = folder / f"{arch.replace('@', '_')}.onnx"
        start = time.perf_counter()
        result = export_onnx(model, path, size=(size, size), check=False)
        export_s = time.perf_counter() - start
        ops = _node_counts(path)
        session = _session(path, threads)
        info[arch] = {"export_s": export_s, "file_mib": path.stat().st_size / 2**20, "onnx_nodes": sum(ops.values()),
                      "grid_sample_nodes": ops.get("GridSample", 0), "opset": result.opset}

        def run_torch(model: Any = model) -> Any:
            return model([image])[0]["boxes"].shape[0]

        def run_ort(session: Any = session) -> Any:
            return session.run(None, {"images": feed})[0].shape[0]

        calls[(arch, "pytorch")] = run_torch
        calls[(arch, "onnxruntime")] = run_ort
    with torch.no_grad():
        stats, boxes = _common.time_round_robin(calls, warmup=warmup, repeats=repeats)
    rows = []
    for (arch, runtime), row in stats.items():
        rows.append({"model": arch, "runtime": runtime, "median_ms": row["median"], "p90_ms": row["p90"],
                     "min_ms": row["min"], "repeats": row["n"], "boxes": int(boxes[(arch, runtime)]), **info[arch]})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=800, help="square input side in pixels (default 800)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and runtime (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of: {', '.join(ALL_MODELS)}")
    _common.add_common_arguments(parser, threads=1)
    args = parser.parse_args(argv)
    args.backbone, args.num_classes = "resnet50", 80
    if args.quick:
        args.size, args.repeats, args.warmup, args.backbone, args.num_classes = 128, 2, 1, "resnet18", 3
        if args.models == ",".join(ALL_MODELS):
            args.models = "fpn-fcos"
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in args.models if m not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}")
    if args.size < 32 or args.size % 32:
        parser.error(f"--size: expected a multiple of 32 (got {args.size}) so that padding adds nothing")
    return args


def to_markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    title = (f"### CPU latency, ONNX Runtime vs PyTorch eager, {settings['size']}x{settings['size']}, batch 1, "
             f"{settings['threads']} thread(s), post-processing included ({settings['backbone']})")
    headers = ["model", "runtime", "median ms", "p90 ms", "x PyTorch", "boxes", "file MiB", "export s", "GridSample nodes"]
    rows = [[r["model"], r["runtime"], r["median_ms"], r["p90_ms"], r.get("ratio_to_pytorch"), r["boxes"],
             r["file_mib"], r["export_s"], r["grid_sample_nodes"]] for r in record["results"]]
    return _common.markdown_report(record, title, _common.markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = _common.set_threads(args.threads)
    import onnxruntime

    started = time.perf_counter()
    settings = {"size": args.size, "threads": threads, "warmup": args.warmup, "repeats": args.repeats,
                "models": list(args.models), "batch": 1, "quick": args.quick, "backbone": args.backbone,
                "num_classes": args.num_classes, "weights": "random (torch.manual_seed(0))",
                "onnxruntime": onnxruntime.__version__}
    record = _common.start_record(NAME, settings, threads)
    with tempfile.TemporaryDirectory(prefix="nasfcos-export-bench-") as folder:
        results = measure_all(args.models, args.size, args.warmup, args.repeats, threads, args.backbone,
                              args.num_classes, Path(folder))
    reference = {r["model"]: r["median_ms"] for r in results if r["runtime"] == "pytorch"}
    for row in results:
        row["ratio_to_pytorch"] = row["median_ms"] / reference[row["model"]]
    record["results"] = results
    record["notes"] += [
        "Random weights; one random image in [0, 1]; batch 1; median/p90 of the timed calls after warm-up; "
        "(model, runtime) pairs timed round-robin (one call each per repeat); both runtimes on the same thread count.",
        "pytorch = model([image]) eager under torch.no_grad (native deformable-conv path); onnxruntime = the file "
        "written by nasfcos.export_onnx(size=(S, S)) on the CPUExecutionProvider (deformable convs as GridSample + Conv).",
        "ratio = median / PyTorch median of the same model; export s = one export_onnx call (check off).",
    ]
    return _common.conclude(record, started, to_markdown, args.out_dir, robust="the ratios are more robust")


if __name__ == "__main__":
    main()
