"""Benchmark: modulated deformable conv (forward + backward) on the CPU, next to a plain conv.

Prints a markdown table and writes ``--out`` (JSON, default ``benchmarks/results/deform_conv.json``) plus the same
table as ``.md`` beside it. Rows: ``F.conv2d`` (a plain 3x3 conv of the same shape: the 1x reference), this
project's op (``nasfcos.nn.deform.deform_conv2d``, native backend), torchvision's CPU kernel (very slow: few repeats;
``--skip-torchvision`` leaves it out) and, for reference, the simple pure-PyTorch formulation the issue measured at
~10x (``grid_sample`` the 9 taps, multiply by the mask, one matmul; ``--skip-grid-sample``).

Shapes: the search's proxy task (batch 32, 64 channels, 48x48, 2 deformable groups) and full training (batch 2,
256 channels, 100x136). Every op computes gradients for all of its inputs (input, offset, mask, weight, bias), as
in training. Timings: untimed warm-up, then repeats interleaved across ops (so background load hits every row
alike), median and p90, ``torch.set_num_threads(--threads)`` (2: this machine's cores). ``--memory`` also
measures, in a fresh process, the peak resident memory of the native op at the paper's proxy batch of 200.

    PYTHONPATH=src .venv/bin/python benchmarks/deform_conv.py [--skip-torchvision] [--memory] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import torch
import torch.nn.functional as F

from nasfcos.nn.deform import deform_conv2d

NAME = "deform_conv"
SHAPES = {
    "proxy": dict(n=32, c=64, h=48, w=48, dg=2),
    "full": dict(n=2, c=256, h=100, w=136, dg=2),
}
QUICK_SHAPES = {"proxy": dict(n=2, c=8, h=12, w=12, dg=2), "full": dict(n=1, c=8, h=10, w=14, dg=2)}
CONV = "F.conv2d (plain 3x3)"
NATIVE = "nasfcos deform_conv2d (native)"
GRID = "grid_sample formulation"
TORCHVISION = "torchvision deform_conv2d (CPU kernel)"
SLOW = (GRID, TORCHVISION)


def make_inputs(n: int, c: int, h: int, w: int, dg: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs like a trained layer's: offsets of about a pixel (some samples fall outside), sigmoid masks."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(n, c, h, w, generator=g),
        weight=torch.randn(c, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5,
        bias=torch.zeros(c),
        offset=torch.randn(n, 2 * dg * 9, h, w, generator=g) * 1.5,
        mask=torch.sigmoid(torch.randn(n, dg * 9, h, w, generator=g)),
    )


def grid_sample_formulation(x, offset, weight, bias, mask):
    """The simple pure-PyTorch DCNv2 (stride 1, padding 1): grid_sample each tap, mask, one matmul."""
    n, c, h, w = x.shape
    dg = mask.shape[1] // 9
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    taps = torch.arange(3, dtype=x.dtype) - 1
    ky, kx = torch.meshgrid(taps, taps, indexing="ij")
    off = offset.view(n, dg, 9, 2, h, w)
    py = ys + ky.reshape(1, 1, 9, 1, 1) + off[:, :, :, 0]  # [n, dg, 9, h, w]
    px = xs + kx.reshape(1, 1, 9, 1, 1) + off[:, :, :, 1]
    grid = torch.stack((px * 2 / (w - 1) - 1, py * 2 / (h - 1) - 1), dim=-1).view(n * dg, 9 * h, w, 2)
    sampled = F.grid_sample(x.view(n * dg, c // dg, h, w), grid, padding_mode="zeros", align_corners=True)
    sampled = sampled.view(n, dg, c // dg, 9, h, w) * mask.view(n, dg, 1, 9, h, w)
    out = torch.matmul(weight.view(weight.shape[0], -1), sampled.reshape(n, c * 9, h * w)) + bias[:, None]
    return out.view(n, -1, h, w)


def ops(skip_torchvision: bool, skip_grid_sample: bool) -> dict[str, Callable[[dict], torch.Tensor]]:
    table: dict[str, Callable[[dict], torch.Tensor]] = {
        CONV: lambda t: F.conv2d(t["x"], t["weight"], t["bias"], padding=1),
        NATIVE: lambda t: deform_conv2d(
            t["x"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"], backend="native"
        ),
    }
    if not skip_grid_sample:
        table[GRID] = lambda t: grid_sample_formulation(t["x"], t["offset"], t["weight"], t["bias"], t["mask"])
    if not skip_torchvision:
        table[TORCHVISION] = lambda t: deform_conv2d(
            t["x"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"], backend="torchvision"
        )
    return table


def forward_backward(fn: Callable[[dict], torch.Tensor], inputs: dict[str, torch.Tensor]) -> float:
    """Seconds for one forward + backward with gradients for every input."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    start = time.perf_counter()
    out = fn(leaves)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def bench_shape(name: str, shape: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    inputs = make_inputs(**shape)
    table = ops(args.skip_torchvision, args.skip_grid_sample)
    times: dict[str, list[float]] = {op: [] for op in table}
    for op, fn in table.items():
        for _ in range(args.warmup if op not in SLOW else 0):
            forward_backward(fn, inputs)
    for r in range(args.repeats):
        for op, fn in table.items():
            if r < (args.slow_repeats if op in SLOW else args.repeats):
                times[op].append(forward_backward(fn, inputs) * 1000)
                print(f"  {name} {op}: {times[op][-1]:.0f} ms", file=sys.stderr, flush=True)
    conv = _common.summarize(times[CONV])["median"]
    results = {}
    for op, ms in times.items():
        stats = _common.summarize(ms)
        results[op] = dict(ms=stats, times_ms=ms, vs_conv=stats["median"] / conv)
    return dict(shape=shape, results=results)


def measure_memory(batch: int, threads: int) -> dict[str, Any]:
    """Peak RSS of one native forward + backward at the proxy shape with ``batch`` images, in a fresh process."""
    code = f"""
import json, sys, torch
torch.set_num_threads({threads})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import deform_conv as b

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB

t = b.make_inputs(n={batch}, c=64, h=48, w=48, dg=2)
leaves = {{k: v.requires_grad_() for k, v in t.items()}}
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
out = b.deform_conv2d(leaves["x"], leaves["offset"], leaves["weight"], leaves["bias"], padding=1,
                      mask=leaves["mask"], backend="native")
out.backward(torch.ones_like(out))
print(json.dumps(dict(base_mib=base, peak_mib=status("VmHWM"))))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_common.ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    pixels = batch * 48 * 48
    # Output, its gradient and the gradients of input, offset and mask (float32).
    grads_mib = pixels * (64 + 64 + 64 + 36 + 18) * 4 / 2**20
    return dict(
        batch=batch,
        peak_rss_mib=got["peak_mib"],
        increase_mib=got["peak_mib"] - got["base_mib"],
        outputs_and_gradients_mib=grads_mib,
        unchunked_columns_mib=pixels * 64 * 9 * 4 / 2**20,
    )


def markdown(record: dict[str, Any]) -> str:
    shapes = record["shapes"]
    headers = ["op"] + [
        f"{name}: N={s['shape']['n']}, C={s['shape']['c']}, {s['shape']['h']}x{s['shape']['w']}, dg={s['shape']['dg']}"
        for name, s in shapes.items()
    ]
    ops_seen: list[str] = []
    for s in shapes.values():
        ops_seen += [op for op in s["results"] if op not in ops_seen]
    rows = []
    for op in ops_seen:
        row = [op]
        for s in shapes.values():
            r = s["results"].get(op)
            row.append("-" if r is None else f"{r['ms']['median']:,.0f} ms ({r['vs_conv']:.1f}x)")
        rows.append(row)
    lines = [
        "# Modulated deformable conv on the CPU: forward + backward",
        "",
        _common.machine_line(record["machine"], record["load"]),
        "",
        "Median wall time of forward + backward (gradients for input, offset, mask, weight, bias); in brackets, "
        "relative to a plain 3x3 `F.conv2d` of the same shape.",
        "",
        _common.markdown_table(headers, rows),
    ]
    if "memory" in record:
        m = record["memory"]
        lines += [
            "",
            f"Memory at batch {m['batch']} (proxy shape, native forward + backward, fresh process): peak RSS grew by "
            f"{m['increase_mib']:,.0f} MiB, of which the output and the gradients are "
            f"{m['outputs_and_gradients_mib']:,.0f} MiB; unchunked sampled columns alone would take "
            f"{m['unchunked_columns_mib']:,.0f} MiB.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(_common.RESULTS_DIR / f"{NAME}.json"), help="JSON path (.md beside it)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of torchvision and grid_sample")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--skip-torchvision", action="store_true")
    parser.add_argument("--skip-grid-sample", action="store_true")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at the proxy batch of 200")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test; not for reporting)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.repeats, args.slow_repeats, args.warmup = 2, 1, 1
    threads = _common.set_threads(args.threads)
    started = time.perf_counter()
    record = _common.start_record(NAME, {k: v for k, v in vars(args).items() if k != "out"}, threads)
    record["benchmark"] = Path(args.out).stem
    record["shapes"] = {name: bench_shape(name, shapes[name], args) for name in args.shapes}
    if args.memory:
        record["memory"] = measure_memory(200, threads)
    _common.finish_record(record, started)
    text = markdown(record)
    paths = _common.write_outputs(record, text, Path(args.out).parent)
    _common.report(text, paths)
    return record


if __name__ == "__main__":
    main()
