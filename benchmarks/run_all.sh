#!/usr/bin/env bash
# Run every benchmark and leave <name>.json / <name>.md in benchmarks/results (or $OUT_DIR).
#
#   benchmarks/run_all.sh            # full CPU benchmarks (tens of minutes on a 2-core machine)
#   benchmarks/run_all.sh --quick    # seconds: tiny settings, written to a temporary folder unless OUT_DIR is set
#
# Environment: PYTHON (default .venv/bin/python), OUT_DIR (default benchmarks/results; --quick: a temp dir),
# THREADS (torch threads for the CPU benchmarks, default 2), OMP_WAIT_POLICY (default PASSIVE: on a machine
# shared with other jobs, spinning OpenMP threads made 2-thread steps 5-60x slower; see benchmarks/README.md).
#
# gpu_paper_settings.py prints "skipped: no CUDA device" and exits 0 without a GPU. The benchmarks owned by
# others (table2.py, deform_conv.py) run with their own defaults when present (not with --quick).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
THREADS="${THREADS:-2}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

QUICK=()
if [[ "${1:-}" == "--quick" ]]; then
    QUICK=(--quick)
    OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
fi
OUT_DIR="${OUT_DIR:-benchmarks/results}"

run() {
    echo
    echo "== $* (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
    "$PYTHON" "$@"
}

run benchmarks/inference_latency.py --threads "$THREADS" --out-dir "$OUT_DIR" "${QUICK[@]}"
run benchmarks/cached_vs_recomputed.py --threads "$THREADS" --out-dir "$OUT_DIR" "${QUICK[@]}"
run benchmarks/proxy_throughput.py --out-dir "$OUT_DIR" "${QUICK[@]}"   # threads: the preset's (proxy-cpu.yaml)
run benchmarks/gpu_paper_settings.py --out-dir "$OUT_DIR" "${QUICK[@]}"
run benchmarks/export_latency.py --threads "$THREADS" --out-dir "$OUT_DIR" "${QUICK[@]}"
run benchmarks/executor_faults.py --out-dir "$OUT_DIR" "${QUICK[@]}"

if [[ ${#QUICK[@]} -eq 0 ]]; then
    [[ -f benchmarks/table2.py ]] && run benchmarks/table2.py
    [[ -f benchmarks/deform_conv.py ]] && run benchmarks/deform_conv.py
    run benchmarks/cpu_preset_ap.py --threads "$THREADS" --out-dir "$OUT_DIR"   # ~1 h: trains two detectors
fi
echo
echo "results in $OUT_DIR"
