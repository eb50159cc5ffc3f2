"""Fault injection for the process executor: workers that die at any moment cost only their own candidate.

Every evaluator here logs each call (``$NASFCOS_TEST_CALLS_FILE``), so "only the culprits charged" is checked
by counting calls: a culprit that dies once runs twice, every bystander exactly once. Deaths are injected at
the first, a middle and the last position of a batch, two at once (both workers die together, synchronised
by marker files), in the middle of sending a result (a partial message on the worker's pipe), while idle, and
during start-up; plus a candidate that hangs (deadline) and ``kill -9`` of the search process (no worker of it
may survive).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nasfcos.search.executors import InlineExecutor, ProcessExecutor
from nasfcos.search.worker_pool import SupervisedPool, WorkerStartupError, current_connection
from test_executors import HERE, MARKER_ENV, make_tasks
from test_search_loop import CALLS_FILE_ENV, _record_call, cache_dir, deterministic_evaluator, quick_cfg, run_cfg

DEADLINE_S = 60.0  # generous upper bound for anything a test waits for (a busy 2-core machine)


def _markers() -> Path:
    return Path(os.environ[MARKER_ENV])


def _die_once(genotype: Any, code: int) -> None:
    marker = _markers() / f"died-{genotype.key()}"
    if not marker.exists():
        marker.write_text("died\n")
        _record_call(genotype.key())  # a call that ends in death; successful calls are logged by
        os._exit(code)                 # deterministic_evaluator


def dies_once(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    _die_once(genotype, 3)
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


def dies_once_together(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    """The first time: wait until the other culprit is running too, then both die."""
    if not (_markers() / f"died-{genotype.key()}").exists():
        (_markers() / f"together-{genotype.key()}").write_text("here\n")
        deadline = time.monotonic() + DEADLINE_S
        while len(list(_markers().glob("together-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    _die_once(genotype, 5)
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


def dies_while_sending(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    """The first time: start a result message (a length header promising 1 MiB), send part of it, die."""
    marker = _markers() / f"died-{genotype.key()}"
    if not marker.exists():
        marker.write_text("died\n")
        _record_call(genotype.key())
        connection = current_connection()
        assert connection is not None, "not running in a supervised worker"
        os.write(connection.fileno(), struct.pack("!i", 1 << 20) + b"\x80\x05partial result")
        os._exit(6)
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


def always_dies(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    _record_call(genotype.key())
    os._exit(4)


def hangs(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    _record_call(genotype.key())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL stops it
    time.sleep(3600)
    raise AssertionError("unreachable")


def writes_pid_then_sleeps(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    (_markers() / f"pid-{os.getpid()}").write_text(str(os.getpid()))
    time.sleep(3600)
    raise AssertionError("unreachable")


def _exit_at_start() -> None:
    os._exit(9)


@pytest.fixture()
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(MARKER_ENV, str(markers))
    path = tmp_path / "calls.txt"
    path.touch()
    monkeypatch.setenv(CALLS_FILE_ENV, str(path))
    return path


def _call_counts(path: Path) -> Counter[str]:
    return Counter(line for line in path.read_text().splitlines() if line)


def _with(task: Any, evaluator: str) -> Any:
    return replace(task, evaluator=f"test_executor_faults:{evaluator}")


def test_deaths_at_first_middle_last_position_cost_only_the_culprit(calls: Path) -> None:
    tasks = make_tasks(7)
    expected = {t.key: o for t, o in InlineExecutor().map_candidates(tasks)}
    calls.write_text("")
    culprits = {0, 3, 6}
    batch = [_with(t, "dies_once") if i in culprits else _with(t, "dies_once_never") for i, t in enumerate(tasks)]
    with ProcessExecutor(workers=2, max_retries=1) as executor:
        results = {t.key: o for t, o in executor.map_candidates(batch)}
    assert sorted(results) == sorted(expected)  # every candidate exactly once
    assert {k: (o.status, o.reward) for k, o in results.items()} == {
        k: (o.status, o.reward) for k, o in expected.items()}
    counts = _call_counts(calls)
    assert {tasks[i].key: counts[tasks[i].key] for i in culprits} == {tasks[i].key: 2 for i in culprits}
    assert all(counts[t.key] == 1 for i, t in enumerate(tasks) if i not in culprits), counts


def dies_once_never(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


def test_two_workers_dying_at_once_and_a_death_during_result_transfer(calls: Path) -> None:
    tasks = make_tasks(5)
    expected = {t.key: o.reward for t, o in InlineExecutor().map_candidates(tasks)}
    calls.write_text("")
    batch = [_with(tasks[0], "dies_once_together"), _with(tasks[1], "dies_once_together"),
             _with(tasks[2], "dies_once_never"), _with(tasks[3], "dies_while_sending"),
             _with(tasks[4], "dies_once_never")]
    with ProcessExecutor(workers=2, max_retries=1) as executor:
        results = {t.key: o for t, o in executor.map_candidates(batch)}
        pids = executor.worker_pids()  # dead workers were replaced as far as the remaining jobs needed them
        assert 1 <= len(pids) <= 2 and all(_alive(pid) for pid in pids)
    assert {k: o.reward for k, o in results.items()} == expected
    assert all(o.status == "ok" for o in results.values())
    counts = _call_counts(calls)
    assert [counts[t.key] for t in tasks] == [2, 2, 1, 2, 1]


def test_a_candidate_that_always_kills_its_worker_fails_alone(calls: Path) -> None:
    tasks = make_tasks(4)
    batch = [_with(tasks[0], "dies_once_never"), _with(tasks[1], "always_dies"),
             _with(tasks[2], "dies_once_never"), _with(tasks[3], "dies_once_never")]
    with ProcessExecutor(workers=2, max_retries=2) as executor:
        results = {t.key: o for t, o in executor.map_candidates(batch)}
        # The pool still works afterwards.
        again = {t.key: o for t, o in executor.map_candidates([_with(tasks[0], "dies_once_never")])}
    assert results[tasks[1].key].status == "failed"
    assert "died (exit code 4)" in results[tasks[1].key].error and "2 retries" in results[tasks[1].key].error
    assert [results[t.key].status for t in (tasks[0], tasks[2], tasks[3])] == ["ok"] * 3
    assert again[tasks[0].key] == results[tasks[0].key]
    counts = _call_counts(calls)
    assert [counts[t.key] for t in tasks] == [2, 3, 1, 1]  # tasks[0] ran twice: once per map_candidates call


def test_a_hanging_candidate_hits_its_deadline_and_the_rest_go_on(calls: Path) -> None:
    tasks = make_tasks(3)
    batch = [_with(tasks[0], "hangs"), _with(tasks[1], "dies_once_never"), _with(tasks[2], "dies_once_never")]
    start = time.monotonic()
    with ProcessExecutor(workers=2, max_retries=2, candidate_timeout_s=3.0) as executor:
        results = {t.key: o for t, o in executor.map_candidates(batch)}
    assert time.monotonic() - start < DEADLINE_S
    assert results[tasks[0].key].status == "failed" and "timed out" in results[tasks[0].key].error
    assert results[tasks[1].key].status == results[tasks[2].key].status == "ok"
    assert _call_counts(calls)[tasks[0].key] == 1  # a timeout is not retried: a hang would hang again


def test_abandoning_a_batch_kills_its_busy_workers_and_close_cannot_hang(calls: Path) -> None:
    tasks = make_tasks(3)
    batch = [_with(tasks[0], "dies_once_never"), _with(tasks[1], "hangs"), _with(tasks[2], "hangs")]
    executor = ProcessExecutor(workers=2, max_retries=0)
    results = executor.map_candidates(batch)
    first_task, first = next(results)
    assert first_task.key == tasks[0].key and first.status == "ok"
    deadline = time.monotonic() + DEADLINE_S
    while _call_counts(calls)[tasks[1].key] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = executor.worker_pids()
    results.close()  # the consumer stops: the workers holding the hanging candidates are killed
    executor.close()
    assert not [pid for pid in pids if _alive(pid)]


def test_workers_that_die_during_start_up_stop_the_run_with_a_message() -> None:
    pool = SupervisedPool(1, _exit_at_start, poll_s=0.2)
    try:
        with pytest.raises(WorkerStartupError, match="died before they were ready.*exit code 9"):
            list(pool.run(abs, [-1, -2]))
    finally:
        pool.close()


def test_a_worker_that_dies_while_idle_costs_nothing(calls: Path) -> None:
    tasks = make_tasks(3)
    with ProcessExecutor(workers=2, max_retries=0) as executor:
        first = {t.key: o for t, o in executor.map_candidates([_with(t, "dies_once_never") for t in tasks[:2]])}
        idle = executor.worker_pids()
        for pid in idle:
            os.kill(pid, signal.SIGKILL)  # both idle workers die between two batches
        deadline = time.monotonic() + DEADLINE_S
        while [pid for pid in idle if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.01)
        second = {t.key: o for t, o in executor.map_candidates([_with(t, "dies_once_never") for t in tasks])}
    assert [o.error for o in [*first.values(), *second.values()] if o.status != "ok"] == []  # max_retries=0: nobody charged


def test_search_with_dying_workers_ends_with_exactly_its_budget(tmp_path: Path, calls: Path) -> None:
    from nasfcos.search.loop import run_search
    from nasfcos.search.store import ResultStore

    cfg = quick_cfg(strategy="random", budget=12, batch_size=6, executor="process", workers=2, max_retries=1)
    summary = run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg),
                         evaluator="test_executor_faults:dies_once_for_a_third", progress=False)
    with ResultStore(tmp_path / "run" / "store.sqlite", readonly=True) as store:
        rows = store.all()
    keys = [r.key for r in rows]
    assert summary.evaluated == len(keys) == len(set(keys)) == 12
    assert all(r.status == "ok" for r in rows)
    counts = _call_counts(calls)
    culprits = [k for k in keys if _is_culprit(k)]
    assert culprits and all(counts[k] == 2 for k in culprits)
    assert all(counts[k] == 1 for k in keys if not _is_culprit(k))


def _is_culprit(key: str) -> bool:
    return int(key[:8], 16) % 3 == 0


def dies_once_for_a_third(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    if _is_culprit(genotype.key()):
        _die_once(genotype, 3)
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


# ---------------------------------------------------------------------------------------------- kill -9


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


SEARCH_SCRIPT = r"""
import sys
sys.path.insert(0, {here!r})
from pathlib import Path
from test_search_loop import quick_cfg, run_cfg
from nasfcos.search.loop import run_search

cfg = quick_cfg(strategy="random", budget=6, batch_size=2, executor="process", workers=2)
run_search(Path({run!r}), run_cfg(Path({cache!r}), cfg), evaluator="test_executor_faults:writes_pid_then_sleeps",
           progress=False)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_kill_9_of_the_search_process_leaves_no_worker_alive(tmp_path: Path, calls: Path) -> None:
    markers = Path(os.environ[MARKER_ENV])
    script = SEARCH_SCRIPT.format(here=HERE, run=str(tmp_path / "run"), cache=str(cache_dir(tmp_path)))
    search = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(list(markers.glob("pid-*"))) < 2 and time.monotonic() < deadline and search.poll() is None:
            time.sleep(0.1)
        assert len(list(markers.glob("pid-*"))) == 2, search.stderr.read().decode() if search.poll() else "no workers"
        workers = [int(p.read_text()) for p in markers.glob("pid-*")]
        children = set(_children(search.pid))
        assert set(workers) <= children
    finally:
        search.kill()  # SIGKILL: no cleanup code of the search process runs
        search.wait(timeout=DEADLINE_S)
    deadline = time.monotonic() + 10.0
    while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], "processes of the killed search still alive"


def _child_square(queue: Any, value: int) -> None:
    queue.put(value * value)


def starts_a_process(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> Any:
    """An evaluator with a process of its own (as a DataLoader with workers has): workers must not be daemonic."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_square, args=(queue, 7))
    child.start()
    value = queue.get(timeout=DEADLINE_S)
    child.join(timeout=DEADLINE_S)
    result = deterministic_evaluator(genotype, cache, cfg, seed=seed)
    assert value == 49, value
    return result


def test_an_evaluator_may_start_processes_of_its_own(calls: Path) -> None:
    tasks = make_tasks(2)
    expected = {t.key: o.reward for t, o in InlineExecutor().map_candidates(tasks)}
    with ProcessExecutor(workers=2, max_retries=0) as executor:
        results = {t.key: o for t, o in executor.map_candidates([_with(t, "starts_a_process") for t in tasks])}
    assert {k: (o.status, o.error) for k, o in results.items()} == {k: ("ok", None) for k in expected}
    assert {k: o.reward for k, o in results.items()} == expected


UNCLOSED_SCRIPT = r"""
import os, sys
sys.path.insert(0, {here!r})
os.environ[{marker_env!r}] = {markers!r}
from test_executors import make_tasks
from nasfcos.search.executors import ProcessExecutor

executor = ProcessExecutor(workers=2)
results = list(executor.map_candidates(make_tasks(2)))
print("PIDS", *executor.worker_pids(), flush=True)
# no close(): the interpreter must still exit, and take its workers with it
"""


def test_a_process_that_never_closes_its_executor_still_exits(tmp_path: Path, calls: Path) -> None:
    script = UNCLOSED_SCRIPT.format(here=HERE, marker_env=MARKER_ENV, markers=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S * 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pids = [int(p) for line in proc.stdout.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
    assert pids
    deadline = time.monotonic() + 10.0
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]
