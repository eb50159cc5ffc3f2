"""Supervised worker processes for jobs that may kill the process running them.

``concurrent.futures.ProcessPoolExecutor`` treats a dead worker as a broken pool: every job in flight fails
with ``BrokenProcessPool``, ``submit`` itself starts raising between two submissions, and ``shutdown`` can
block forever joining a worker that waits on the shared call queue. A search of thousands of architectures
*expects* some candidates to kill their worker (the OOM killer, a segfault in an op), so this module supervises
its workers one by one instead:

- Every worker has its **own duplex pipe** and runs **one job at a time**, acknowledging each job before it
  starts it. The parent always knows which job a worker holds, so a worker that dies after the acknowledgement
  (its process sentinel fires, or its pipe ends before a whole message arrived — also in the middle of sending
  a result) costs exactly that job one retry, and nobody else anything. A worker that dies while idle, while
  starting, or between receiving a job and acknowledging it costs no job at all; it is replaced and the job
  handed to another worker.
- Jobs are handed only to workers that have said they are ready, so a crash during start-up (imports, the
  initializer) is never charged to a job. Repeated start-up crashes are an environment problem and stop the run
  with :class:`WorkerStartupError` instead of looping.
- **Every wait has a deadline**: the parent wakes at least every ``poll_s`` seconds, a worker must be ready
  within ``start_timeout_s``, a job may run at most ``job_timeout_s`` (then its worker is killed and the job
  reported as timed out, not retried: a deterministic hang would hang again), and :meth:`SupervisedPool.close`
  asks, then terminates, then kills — it cannot hang.
- Workers are **not daemonic**, so a job may start processes of its own (e.g. a DataLoader with workers); a pool
  that was never closed closes itself at interpreter exit (before multiprocessing would join its workers).
- **Workers never outlive the parent**: each worker runs a watchdog thread that exits the process as soon as its
  parent process is gone (``os.getppid()`` changes when the parent dies, by ``kill -9`` or otherwise), even in
  the middle of a long job. Workers ignore SIGINT, so Ctrl-C reaches only the parent, which then closes them.

Workers use the ``spawn`` start method (safe with torch and threads). A job is ``fn(arg)`` with ``fn`` a
module-level function (pickled by reference) and ``arg`` picklable; results must be picklable too (a result
that cannot be pickled comes back as an error, the stream stays intact because pickling precedes sending).
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so ours (registered later) runs first
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

__all__ = ["JobResult", "SupervisedPool", "WorkerStartupError", "describe_exit"]

#: How often a worker checks that its parent is still alive.
PARENT_CHECK_S = 0.2

#: Consecutive workers that may die before becoming ready until the pool gives up.
MAX_STARTUP_FAILURES = 3

_connection: Connection | None = None  # the running worker's pipe to its parent (fault-injection tests use it)


class WorkerStartupError(RuntimeError):
    """Workers keep dying before they are ready (broken environment, failing initializer)."""


@dataclass(frozen=True)
class JobResult:
    """How one job ended.

    ``kind``: ``"ok"`` (``value`` is ``fn``'s return value), ``"error"`` (``value`` is the exception ``fn``
    raised, re-created in the parent), ``"died"`` (its worker died on every attempt; ``message`` says how the
    last one ended) or ``"timeout"`` (it ran longer than the job deadline; its worker was killed).
    ``attempts``: how many times the job was started.
    """

    kind: Literal["ok", "error", "died", "timeout"]
    value: Any = None
    message: str = ""
    attempts: int = 1


def describe_exit(exitcode: int | None) -> str:
    """``exit code 3``, ``killed by SIGKILL`` (the OOM killer's signal), ..."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


# ------------------------------------------------------------------------------------------------ worker side


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(70)  # the parent is gone: nobody will read our result
        time.sleep(PARENT_CHECK_S)


def current_connection() -> Connection | None:
    """The running worker's pipe to its parent (``None`` outside a worker)."""
    return _connection


def _worker_main(conn: Connection, parent_pid: int, initializer: Callable[..., Any] | None,
                 initargs: tuple[Any, ...]) -> None:
    """A worker's whole life: watchdog, initializer, ``ready``, then one job at a time until told to stop."""
    global _connection
    _connection = conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(70)
    if initializer is not None:
        initializer(*initargs)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, fn, arg = message
        conn.send(("started", job_id))  # from here on a death is this job's fault
        try:
            reply = ("ok", job_id, fn(arg))
        except Exception as exc:  # the job's own failure travels back as data
            reply = ("error", job_id, exc)
        try:
            conn.send(reply)
        except Exception as exc:  # unpicklable result or exception: pickling precedes sending, stream intact
            conn.send(("error", job_id, RuntimeError(f"result could not be sent to the parent: "
                                                     f"{type(exc).__name__}: {exc}")))


# ------------------------------------------------------------------------------------------------ parent side


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    started: float
    ready: bool = False
    job: int | None = None
    job_started: float = 0.0
    acknowledged: bool = False  # the worker said it started the job (a death before that costs nothing)


def _close_if_alive(pool_ref: weakref.ReferenceType[SupervisedPool]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.close()


class SupervisedPool:
    """Up to ``workers`` spawned processes running jobs one at a time each; see the module docstring.

    Workers are started lazily and kept across :meth:`run` calls. ``initializer(*initargs)`` runs once in
    every worker before it takes a job.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        job_timeout_s: float | None = None,
        start_timeout_s: float = 300.0,
        poll_s: float = 1.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        self.size = int(workers)
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.job_timeout_s = job_timeout_s
        self.start_timeout_s = float(start_timeout_s)
        self.poll_s = float(poll_s)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._last_startup_exit = ""
        # Workers are not daemonic, so an evaluator may start processes of its own (a DataLoader with workers);
        # multiprocessing joins non-daemonic children at interpreter exit, so an unclosed pool closes itself first.
        atexit.register(_close_if_alive, weakref.ref(self))

    # -- worker management ---------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Process ids of the live workers (tests, diagnostics)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, os.getpid(), self.initializer, self.initargs),
            name="nasfcos-worker", daemon=False,
        )
        process.start()
        child_end.close()  # the parent keeps only its end: a dead worker then reads as end-of-file
        worker = _Worker(process=process, conn=parent_end, started=time.monotonic())
        self._workers.append(worker)
        return worker

    def _discard(self, worker: _Worker, kill: bool) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()

    def _note_startup_failure(self, worker: _Worker) -> None:
        self._startup_failures += 1
        self._last_startup_exit = describe_exit(worker.process.exitcode)
        if self._startup_failures >= MAX_STARTUP_FAILURES:
            raise WorkerStartupError(
                f"{self._startup_failures} worker processes in a row died before they were ready "
                f"(last: {self._last_startup_exit}); see the messages above"
            )

    # -- running -------------------------------------------------------------------------------------------

    def run(self, fn: Callable[[Any], Any], args: Sequence[Any], max_retries: int = 2) -> Iterator[tuple[int, JobResult]]:
        """Run ``fn(args[i])`` for every ``i``; yield ``(i, JobResult)`` in completion order, exactly once each.

        A job whose worker dies is started again, at most ``max_retries`` more times. Closing the generator
        early (the consumer stopped or raised) kills the workers still busy with its jobs.
        """
        queue: deque[int] = deque(range(len(args)))
        attempts = [0] * len(args)
        left = len(args)
        try:
            while left:
                ended_now = self._dispatch(queue, fn, args, attempts)
                for index, result in [*ended_now, *self._collect(queue, attempts, max_retries)]:
                    left -= 1
                    yield index, result
        finally:
            for worker in [w for w in self._workers if w.job is not None]:
                self._discard(worker, kill=True)  # only reached with jobs of this run still in flight

    def _dispatch(self, queue: deque[int], fn: Callable[[Any], Any], args: Sequence[Any],
                  attempts: list[int]) -> list[tuple[int, JobResult]]:
        """Start workers up to what the queue needs, then hand one job to each ready, idle worker.

        Returns the jobs that ended at once: those that cannot be pickled (nothing was written to the pipe)."""
        unsendable: list[tuple[int, JobResult]] = []
        busy = sum(1 for w in self._workers if w.job is not None)
        while len(self._workers) < min(self.size, busy + len(queue)):
            self._spawn()
        for worker in [w for w in self._workers if w.ready and w.job is None]:
            if not queue:
                break
            index = queue.popleft()
            try:
                worker.conn.send((index, fn, args[index]))
            except (BrokenPipeError, ConnectionError, EOFError):
                queue.appendleft(index)  # died while idle, before it got the job: replace it, charge nobody
                self._discard(worker, kill=True)
                continue
            except Exception as exc:  # the job itself cannot be pickled (nothing was written)
                error = TypeError(f"cannot be sent to a worker: {type(exc).__name__}: {exc}")
                unsendable.append((index, JobResult("error", value=error, attempts=0)))
                continue
            attempts[index] += 1
            worker.job, worker.job_started, worker.acknowledged = index, time.monotonic(), False
        return unsendable

    def _deadline(self) -> float:
        now = time.monotonic()
        timeout = self.poll_s
        for worker in self._workers:
            if not worker.ready:
                timeout = min(timeout, worker.started + self.start_timeout_s - now)
            elif worker.job is not None and self.job_timeout_s is not None:
                timeout = min(timeout, worker.job_started + self.job_timeout_s - now)
        return max(0.0, timeout)

    def _collect(self, queue: deque[int], attempts: list[int],
                 max_retries: int) -> Iterator[tuple[int, JobResult]]:
        """Wait (with a deadline) for messages or deaths and turn them into results and retries."""
        handles: list[Any] = []
        for worker in self._workers:
            handles += [worker.conn, worker.process.sentinel]
        ready = set(wait(handles, timeout=self._deadline())) if handles else set()
        for worker in list(self._workers):
            message, broken = None, False
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except Exception:  # EOF, a message cut off by the worker's death, garbage: the worker is gone
                    broken = True
            if message is not None:
                result = self._on_message(worker, message, attempts)
                if result is not None:
                    yield result
                continue
            if broken or worker.process.sentinel in ready:
                result = self._on_death(worker, queue, attempts, max_retries)
                if result is not None:
                    yield result
                continue
            now = time.monotonic()
            if not worker.ready and now - worker.started > self.start_timeout_s:
                self._discard(worker, kill=True)
                self._note_startup_failure(worker)
            elif worker.job is not None and self.job_timeout_s is not None \
                    and now - worker.job_started > self.job_timeout_s:
                index = worker.job
                self._discard(worker, kill=True)
                yield index, JobResult("timeout", message=f"ran longer than {self.job_timeout_s:g} s; worker killed",
                                       attempts=attempts[index])

    def _on_message(self, worker: _Worker, message: Any, attempts: list[int]) -> tuple[int, JobResult] | None:
        if message[0] == "ready":
            worker.ready = True
            self._startup_failures = 0
            return None
        if message[0] == "started":
            worker.acknowledged = True
            return None
        kind, index, value = message
        if index != worker.job:  # cannot happen with one job per worker; refuse to guess
            raise RuntimeError(f"worker {worker.process.pid} answered job {index} while holding {worker.job}")
        worker.job = None
        return index, JobResult(kind, value=value, attempts=attempts[index])

    def _on_death(self, worker: _Worker, queue: deque[int], attempts: list[int],
                  max_retries: int) -> tuple[int, JobResult] | None:
        index, was_ready = worker.job, worker.ready
        self._discard(worker, kill=True)
        how = describe_exit(worker.process.exitcode)
        if not was_ready:
            self._note_startup_failure(worker)
            return None
        if index is None:
            return None  # died while idle: nothing to charge
        if not worker.acknowledged:  # died before it took the job: requeue it, uncharged
            attempts[index] -= 1
            queue.appendleft(index)
            return None
        if attempts[index] > max_retries:
            return index, JobResult("died", message=f"worker process died ({how}); gave up after "
                                                     f"{max_retries} retries", attempts=attempts[index])
        queue.appendleft(index)  # its own retry, first in line
        return None

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker: ask, wait up to ``timeout_s``, then terminate, then kill. Never blocks longer."""
        workers, self._workers = list(self._workers), []
        for worker in workers:
            try:
                worker.conn.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=1.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=1.0)
            worker.conn.close()
