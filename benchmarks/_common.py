"""Shared plumbing of the benchmark scripts: machine record, load average, timing statistics, output files.

Why one module: every figure a benchmark prints must say on which machine, with which library versions and
thread count, and under what background load it was measured — a number without that is not reproducible
(this project's development machine has 2 cores shared with other jobs). Each script calls
:func:`start_record` before measuring and :func:`finish_record` after, and writes ``<name>.json`` and
``<name>.md`` with :func:`write_outputs`.

Timing convention: untimed warm-up calls first (allocator, oneDNN/cuDNN kernel selection, lazy init), then
``repeats`` timed calls; we report the **median** (robust to a background job stealing a core for a moment)
and the **p90** (nearest rank), never the mean alone. Timings are never asserted in tests.

Scripts import this as ``import _common`` (the ``benchmarks/`` folder is on ``sys.path`` when a script runs
as ``python benchmarks/x.py``; :func:`ensure_src_on_path` adds ``src/`` so no install is needed).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def ensure_src_on_path() -> None:
    """Make ``import nasfcos`` work from a checkout without installing it."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


ensure_src_on_path()


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int | None:
    """Distinct ``(physical id, core id)`` pairs of ``/proc/cpuinfo``; ``None`` when it cannot be read."""
    try:
        pairs = set()
        physical = core = None
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        pairs.add((physical, core))
                    physical = core = None
        if core is not None:
            pairs.add((physical, core))
        return len(pairs) or None
    except OSError:
        return None


def load_average() -> list[float] | None:
    """``[1 min, 5 min, 15 min]`` load average (what ``uptime`` shows), or ``None`` where unsupported."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


#: Environment variables that change CPU timings; recorded when set. ``OMP_WAIT_POLICY=PASSIVE`` matters on a
#: machine shared with other jobs: with the default (spinning) policy, torch's OpenMP threads busy-wait at every
#: barrier for a thread the scheduler has parked, and a 2-thread run on 2 busy cores got 5-60x slower per step
#: (measured while writing these scripts); ``run_all.sh`` sets PASSIVE unless told otherwise.
ENV_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
            "NASFCOS_DEFORM_BACKEND", "CUDA_VISIBLE_DEVICES")


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU, cores, library versions, torch threads, date — recorded next to every figure."""
    import numpy
    import torch

    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        tv_version = None
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch": torch.__version__,
        "torchvision": tv_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch_threads": int(threads if threads is not None else torch.get_num_threads()),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "cuda_available": bool(torch.cuda.is_available()),
        "env": {name: os.environ.get(name) for name in ENV_VARS if os.environ.get(name) is not None},
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_runtime"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_line(info: Mapping[str, Any], load: Mapping[str, Any] | None = None) -> str:
    """One markdown line: ``Machine: <cpu>, N cores, torch x, torchvision y, T threads, date; load ...``."""
    parts = [
        f"{info.get('cpu_model')}",
        f"{info.get('logical_cores')} logical cores",
        f"torch {info.get('torch')}",
        f"torchvision {info.get('torchvision')}",
        f"{info.get('torch_threads')} torch threads",
    ]
    if info.get("cuda_device"):
        parts.append(f"GPU {info['cuda_device']} (CUDA {info.get('cuda_runtime')})")
    for name, value in (info.get("env") or {}).items():
        if name.startswith(("OMP", "GOMP", "KMP", "MKL")):
            parts.append(f"{name}={value}")
    parts.append(str(info.get("date")))
    line = "Machine: " + ", ".join(parts)
    if load:
        line += f"; load average (1/5/15 min) before {_fmt_load(load.get('before'))}, after {_fmt_load(load.get('after'))}"
        if load.get("during_mean") is not None:
            line += (f", 1-min load during the run mean {load['during_mean']:.2f} / max {load['during_max']:.2f} "
                     f"(this run's own {load.get('own_threads', '?')} thread(s) included)")
        if load.get("others_estimate") is not None:
            line += f", other jobs ~{load['others_estimate']:.1f} runnable threads"
        if load.get("loaded"):
            line += " — **the machine was busy with other jobs during this measurement**"
    return line


def _fmt_load(values: Sequence[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)


# ------------------------------------------------------------------------------------------------ records


class LoadSampler:
    """Reads the 1-minute load average every ``interval`` seconds on a daemon thread while a benchmark runs
    (the readings before and after alone miss other jobs that come and go during a long run)."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            reading = load_average()
            if reading:
                self.samples.append(reading[0])

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=1.0)
        return list(self.samples)


_SAMPLERS: dict[int, LoadSampler] = {}


def start_record(name: str, settings: Mapping[str, Any], threads: int | None = None, *,
                 own_threads: int | None = None) -> dict[str, Any]:
    """The result dict of one run: benchmark name, settings, machine and the load average before measuring;
    starts sampling the load until :func:`finish_record`. ``own_threads``: the runnable threads the benchmark
    itself keeps busy when that is not its torch thread count (worker processes: workers x their threads), so
    they are not counted as other jobs."""
    record = {
        "benchmark": name,
        "settings": dict(settings),
        "machine": machine_info(threads),
        "load": {"before": load_average(), "after": None, "during_mean": None, "during_max": None,
                 "during_samples": 0, "loaded": None, "own_threads": own_threads},
        "notes": [],
    }
    _SAMPLERS[id(record)] = LoadSampler().start()
    return record


def finish_record(record: dict[str, Any], started: float | None = None) -> dict[str, Any]:
    """Add the load after (and sampled during) the measurement and whether other jobs competed for the cores.

    The load average counts runnable threads, this benchmark's own included: while it computes, about
    ``torch_threads`` of the figure are our own. ``others_estimate`` is the mean 1-minute load during the run
    minus our threads (for a run too short to sample: the reading before it), and the machine counts as
    ``loaded`` when that exceeds 75 % of the logical cores (timings are then pessimistic and noisy).
    ``during_*`` are 1-minute load readings taken every 5 s.
    """
    sampler = _SAMPLERS.pop(id(record), None)
    samples = sampler.stop() if sampler else []
    after = load_average()
    load = record["load"]
    load["after"] = after
    if samples:
        load["during_mean"] = round(statistics.fmean(samples), 2)
        load["during_max"] = round(max(samples), 2)
    load["during_samples"] = len(samples)
    cores = os.cpu_count() or 1
    own = int(record["load"].get("own_threads") or record.get("machine", {}).get("torch_threads") or 1)
    before = load["before"]
    if samples:  # what the run saw; the reading before still holds the tail of whatever ran until then
        others = statistics.fmean(samples) - own
    else:  # a run of seconds: the reading before is the best guess
        others = before[0] if before else None
    load["others_estimate"] = None if others is None else round(max(0.0, others), 2)
    load["loaded"] = others is not None and others > 0.75 * cores
    load["logical_cores"] = cores
    load["own_threads"] = own
    if started is not None:
        record["wall_s"] = round(time.perf_counter() - started, 2)
    return record


# ------------------------------------------------------------------------------------------------ timing


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100 (p90 of 10 values is the 9th smallest)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (``None`` for one value), min and max of the values that exist: a
    result's spread over seeds."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "min": min(present), "max": max(present), "n": len(present)}


def seconds_per_step(log_path: Path) -> float | None:
    """Median seconds per step between consecutive logged training steps of a trainer's ``log.jsonl``
    (``None`` when the log is missing or has fewer than two steps): the median, because a checkpoint or an
    evaluation between two logged steps makes that one interval long."""
    if not log_path.is_file():
        return None
    points = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "train/loss" in row and row.get("step") is not None and "time" in row:
            points.append((int(row["step"]), float(row["time"])))
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if s1 > s0]
    return float(statistics.median(rates)) if rates else None


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``median, p90, min, max, n`` of a list of timings (same unit in and out)."""
    return {
        "median": float(statistics.median(values)),
        "p90": percentile(values, 90),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def time_calls(
    fn: Callable[[], Any], *, warmup: int, repeats: int, synchronize: Callable[[], None] | None = None
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; seconds per call.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops, so
    asynchronous GPU work is inside the measured interval.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def time_round_robin(
    calls: Mapping[Any, Callable[[], Any]], *, warmup: int, repeats: int
) -> tuple[dict[Any, dict[str, Any]], dict[Any, Any]]:
    """Time several calls against each other: ``(summary in ms per key, what each key's last warm-up call
    returned)``.

    Every call is warmed up first (at least once, so its result is known), then repeat ``r`` runs every call
    once before repeat ``r + 1`` starts: a change in background load hits all rows alike, so ratios between
    rows stay fair where absolute times do not.
    """
    results: dict[Any, Any] = {}
    for key, fn in calls.items():
        for _ in range(max(1, warmup)):
            results[key] = fn()
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            times[key] += time_calls(fn, warmup=0, repeats=1)
    return {key: summarize([t * 1000.0 for t in values]) for key, values in times.items()}, results


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` (``None``: leave it) and return the count in effect."""
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads: expected a positive integer (got {threads})")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ output


def fmt(value: Any, digits: int = 3) -> str:
    """Compact number for a table cell (``-`` for ``None``; 3 significant-ish decimals)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(record: Mapping[str, Any], title: str, *blocks: str) -> str:
    """The layout every ``<name>.md`` shares: ``title``, the machine line, the ``blocks`` (tables, paragraphs)
    and the record's notes as a list, separated by blank lines."""
    notes = "\n".join(f"- {note}" for note in record.get("notes", []))
    parts = [title, machine_line(record["machine"], record["load"]), *blocks, notes]
    return "\n\n".join(part for part in parts if part)


def write_outputs(record: Mapping[str, Any], markdown: str, out_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<benchmark>.json`` and ``.md`` atomically; return both paths."""
    from nasfcos.io import atomic_write_json, atomic_write_text

    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    name = record["benchmark"]
    json_path = atomic_write_json(folder / f"{name}.json", _jsonable(record))
    md_path = atomic_write_text(folder / f"{name}.md", markdown.rstrip() + "\n")
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples -> lists, non-finite floats -> None so the file stays strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository root when it lies inside it (JSON files stay machine-independent)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(path)


def add_common_arguments(parser: Any, *, threads: int | None = 2) -> None:
    """``--out-dir`` and ``--threads`` (every script), ``--quick`` (tiny settings for the smoke test)."""
    parser.add_argument("--out-dir", default=str(RESULTS_DIR),
                        help="folder for <name>.json and <name>.md (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch.set_num_threads (default: {threads})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (seconds; used by tests/test_benchmarks_smoke.py) — not for reporting")


def report(markdown: str, paths: Sequence[Path]) -> None:
    """Print the markdown and where the files went."""
    print(markdown)
    print()
    for path in paths:
        print(f"wrote {path}")


def conclude(
    record: dict[str, Any],
    started: float,
    markdown_of: Callable[[Mapping[str, Any]], str],
    out_dir: str | os.PathLike[str] | None,
    *,
    robust: str = "",
) -> dict[str, Any]:
    """Finish ``record`` (load after), note a loaded machine, write ``<name>.json``/``.md`` and print them.

    ``robust`` names what stays meaningful under load (e.g. "the ratios are more robust").
    """
    finish_record(record, started)
    if record["load"]["loaded"]:
        tail = f"; {robust}" if robust else ""
        record["notes"].append(
            f"The machine was loaded by other jobs while measuring (see load): absolute times are pessimistic and noisy{tail}."
        )
    markdown = markdown_of(record)
    report(markdown, write_outputs(record, markdown, out_dir))
    return record
