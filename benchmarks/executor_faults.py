"""Which process pool survives workers that die? The fault-injection scenario against three designs.

Why this exists: the search's process executor used ``concurrent.futures.ProcessPoolExecutor``, which raised
``BrokenProcessPool`` from ``submit`` and once hung in ``shutdown`` after a candidate killed its worker. This
script runs the same scenario through each design a user could pick and counts what a dying worker costs:

- ``concurrent.futures`` — ``ProcessPoolExecutor`` (spawn), rebuilt after each break and every unfinished job
  resubmitted (the only recovery it allows: a break fails every job in flight, so the culprit is unknown);
- ``loky`` — ``loky.get_reusable_executor`` (joblib's executor "made for crashing workers"), same recovery;
- ``supervised`` — :class:`nasfcos.search.worker_pool.SupervisedPool` (one job per worker, acknowledged).

Scenario: ``--jobs`` jobs of ``--job-s`` seconds each on 2 workers; the jobs at the first, a middle and the last
position kill their worker the first time they run (marker files), and two adjacent jobs die together. Reported
per design: results (must equal the job count), bystander re-runs (runs of jobs that never died, beyond their
first — a charge to an innocent candidate), culprit runs, errors, wall time, and whether it finished within the
deadline. ``python benchmarks/executor_faults.py [--jobs 12] [--job-s 0.3]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers import this module by name

DEADLINE_S = 120.0


def job(arg: tuple[int, str, float, bool]) -> int:
    """Sleep ``seconds``; a culprit dies (exit 3) the first time. Every run is logged to the marker folder."""
    index, folder, seconds, culprit = arg
    marker = Path(folder) / f"died-{index}"
    with open(Path(folder) / "runs.txt", "a", encoding="utf-8") as handle:
        handle.write(f"{index}\n")
    time.sleep(seconds)
    if culprit and not marker.exists():
        marker.write_text("died\n")
        os._exit(3)
    return index


def _culprits(jobs: int) -> set[int]:
    return {0, jobs // 2, jobs // 2 + 1, jobs - 1}  # first, two adjacent in the middle (die together), last


def _futures_design(make_pool: Any, args: list[tuple[int, str, float, bool]], broken_types: tuple[type, ...],
                    max_retries: int) -> tuple[dict[int, int], list[str]]:
    """Submit everything; after a break rebuild the pool and resubmit what did not finish (attempts counted
    for every job in flight, since the culprit cannot be told apart)."""
    results: dict[int, int] = {}
    errors: list[str] = []
    attempts: Counter[int] = Counter()
    todo = list(range(len(args)))
    pool = make_pool()
    while todo:
        futures = {}
        for i in todo:
            try:
                futures[pool.submit(job, args[i])] = i
            except broken_types as exc:  # submit itself raises once the pool is broken
                errors.append(f"submit: {type(exc).__name__}")
                break
        unfinished = [i for i in todo if i not in futures.values()]
        for future, i in futures.items():
            try:
                results[i] = future.result(timeout=DEADLINE_S)
            except broken_types as exc:
                errors.append(type(exc).__name__)
                attempts[i] += 1
                if attempts[i] <= max_retries:
                    unfinished.append(i)
        todo = sorted(set(unfinished))
        if todo:
            _shutdown(pool)
            pool = make_pool()
    _shutdown(pool)
    return results, errors


def _shutdown(pool: Any) -> None:
    """``shutdown(wait=True)`` in a thread, abandoned after 30 s (it can hang; we record that, not wait)."""
    thread = threading.Thread(target=pool.shutdown, kwargs={"wait": True}, daemon=True)
    thread.start()
    thread.join(30.0)
    if thread.is_alive():
        raise TimeoutError("shutdown hung for 30 s")


def _supervised(args: list[tuple[int, str, float, bool]], max_retries: int) -> tuple[dict[int, int], list[str]]:
    from nasfcos.search.worker_pool import SupervisedPool

    pool = SupervisedPool(2)
    results: dict[int, int] = {}
    errors: list[str] = []
    try:
        for index, result in pool.run(job, args, max_retries=max_retries):
            if result.kind == "ok":
                results[index] = result.value
            else:
                errors.append(result.kind)
    finally:
        pool.close()
    return results, errors


def run_design(name: str, jobs: int, seconds: float, max_retries: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix=f"nasfcos-faults-{name}-")
    culprits = _culprits(jobs)
    args = [(i, folder, seconds, i in culprits) for i in range(jobs)]
    start = time.perf_counter()
    outcome: dict[str, Any] = {"design": name}
    try:
        if name == "concurrent.futures":
            from concurrent.futures.process import BrokenProcessPool

            results, errors = _futures_design(
                lambda: cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")),
                args, (BrokenProcessPool,), max_retries)
        elif name == "loky":
            import loky
            from loky.process_executor import TerminatedWorkerError

            results, errors = _futures_design(lambda: loky.get_reusable_executor(max_workers=2, reuse=False),
                                              args, (TerminatedWorkerError, cf.process.BrokenProcessPool),
                                              max_retries)
        else:
            results, errors = _supervised(args, max_retries)
        outcome["finished"] = True
    except Exception as exc:  # a hang (TimeoutError) or a crash of the design itself
        results, errors = {}, [f"{type(exc).__name__}: {exc}"]
        outcome["finished"] = False
    runs = Counter(int(line) for line in (Path(folder) / "runs.txt").read_text().split())
    outcome.update({
        "results": len(results),
        "correct": results == {i: i for i in range(jobs)},
        "bystander_extra_runs": sum(max(0, runs[i] - 1) for i in range(jobs) if i not in culprits),
        "culprit_runs": sum(runs[i] for i in culprits),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "wall_s": round(time.perf_counter() - start, 2),
    })
    return outcome


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    rows = [[r["design"], f"{r['results']}/{settings['jobs']}", "yes" if r["correct"] else "no",
             r["bystander_extra_runs"], r["culprit_runs"], r["errors"], _common.fmt(r["wall_s"], 1),
             "yes" if r["finished"] else "no"] for r in record["designs"]]
    lines = [
        "# Executor fault injection: what a dying worker costs",
        "",
        _common.machine_line(record["machine"], record["load"]),
        "",
        f"{settings['jobs']} jobs of {settings['job_s']} s on 2 workers; jobs {sorted(_culprits(settings['jobs']))} "
        f"kill their worker the first time (two of them together); at most {settings['max_retries']} retries.",
        "",
        _common.markdown_table(["design", "results", "correct", "bystander re-runs", "culprit runs", "errors",
                                "wall (s)", "finished"], rows),
    ]
    return "\n".join(lines + [""] + [f"- {note}" for note in record["notes"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser, threads=1)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--job-s", type=float, default=0.3)
    parser.add_argument("--max-retries", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.job_s = 6, 0.05
    designs = ["concurrent.futures", "supervised"]
    if importlib.util.find_spec("loky") is not None:
        designs.insert(1, "loky")
    record = _common.start_record("executor_faults", {"jobs": args.jobs, "job_s": args.job_s,
                                                      "max_retries": args.max_retries, "designs": designs})
    if "loky" not in designs:
        record["notes"].append("loky is not installed (pip install loky): its row is missing.")
    started = time.perf_counter()
    record["designs"] = [run_design(name, args.jobs, args.job_s, args.max_retries) for name in designs]
    _common.conclude(record, started, markdown, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
