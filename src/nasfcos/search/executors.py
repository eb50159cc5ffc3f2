"""Where candidates are evaluated: this process, a local process pool, or a Ray cluster.

All executors share one interface, :meth:`Executor.map_candidates`: give it a batch of
:class:`~nasfcos.search.runner.CandidateTask` and iterate over ``(task, EvaluationResult)`` pairs *as they
complete* (not in submission order), so the loop can store each result the moment it exists — a kill loses
at most the candidates still running. Every task yields exactly one outcome: a worker that crashes has its
candidate retried, and after the retries the candidate is reported ``failed`` with the reason (the search
goes on). Executors are context managers; :meth:`Executor.close` releases the pool / the Ray instance.

- :class:`InlineExecutor`: one candidate after another in this process (tests, debugging, 1-core machines).
- :class:`ProcessExecutor`: ``workers`` supervised processes (:mod:`nasfcos.search.worker_pool`, ``spawn``
  start method), one candidate at a time each. Each worker limits torch to ``cpu_count // workers`` threads so
  K workers do not fight over the cores. A worker that dies (``os._exit``, a segfault, the OOM killer) — before,
  during or between candidates, several at once — costs only the candidate it held one retry (at most
  ``max_retries``, then it is recorded failed); workers exit by themselves when the search process dies,
  however it dies; ``candidate_timeout_s`` bounds one candidate (its worker is killed, the candidate failed).
- :class:`RayExecutor`: each candidate is a Ray task with the resources it needs (``num_cpus_per_task``,
  ``num_gpus_per_task`` — fractions allowed, e.g. 0.25 to pack four proxy runs on a GPU). Ray retries a task
  whose worker died (``max_retries``); a ``RayError`` that still surfaces is resubmitted ``executor_retries``
  more times by the executor and then recorded as failed. The cache travels as a *path*: it must be on storage
  every node can read (the same path), and every node needs ``nasfcos`` installed.

  Without ``address`` a **local** Ray instance is started that listens on the loopback interface only (Ray
  turns ``127.0.0.1`` into the machine's public address unless its cluster mode is off, so it is started with
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), uses a private random authentication token (nothing written to
  ``~/.ray``), no dashboard, and keeps its temporary files and logs under ``<run_dir>/ray``. Ray's unix socket
  paths must stay under ~107 characters, so when that folder's path is long the files go to a short
  ``/tmp/nasfcos-ray-*`` folder and ``<run_dir>/ray`` becomes a symlink to it (also recorded in
  ``<run_dir>/ray_temp_dir.txt``). With ``address`` (``"auto"``, ``"host:port"`` or ``"ray://host:port"``)
  the executor joins that existing cluster instead and leaves it running on close.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.search.results import EvaluationResult
from nasfcos.search.runner import CandidateTask, run_task, set_worker_threads
from nasfcos.search.worker_pool import JobResult, SupervisedPool

__all__ = [
    "EXECUTORS",
    "Executor",
    "InlineExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "build_executor",
    "default_threads",
]

EXECUTORS = ("inline", "process", "ray")

#: Longest temp-dir path handed to Ray: its session folder and socket names add ~65 characters and a unix
#: socket path may not exceed ~107.
RAY_TEMP_DIR_MAX_CHARS = 40


def default_threads(workers: int) -> int:
    """Torch threads per worker so that ``workers`` workers share the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class Executor(ABC):
    """Evaluates batches of candidates; see the module docstring."""

    name: str = "executor"

    @abstractmethod
    def map_candidates(self, tasks: Sequence[CandidateTask]) -> Iterator[tuple[CandidateTask, EvaluationResult]]:
        """Yield ``(task, outcome)`` for every task, in completion order."""

    @property
    def threads(self) -> int | None:
        """Torch threads a task should use (set on each task by :meth:`prepare`)."""
        return None

    def prepare(self, task: CandidateTask) -> CandidateTask:
        """The task as this executor ships it (fills in the worker thread count)."""
        if task.threads is None and self.threads is not None:
            from dataclasses import replace

            return replace(task, threads=self.threads)
        return task

    def describe(self) -> dict[str, Any]:
        """Settings for the run log."""
        return {"executor": self.name}

    def close(self) -> None:
        """Release workers; the executor must not be used afterwards."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs each candidate in this process, in order. ``evaluator`` may be any callable (even a lambda)."""

    name = "inline"

    def __init__(self, evaluator: Callable[..., Any] | None = None) -> None:
        self.evaluator = evaluator

    def map_candidates(self, tasks: Sequence[CandidateTask]) -> Iterator[tuple[CandidateTask, EvaluationResult]]:
        for task in tasks:
            task = self.prepare(task)
            yield task, run_task(task, self.evaluator)


class ProcessExecutor(Executor):
    """``workers`` supervised, spawned processes (kept across batches); see the module docstring and
    :mod:`nasfcos.search.worker_pool` for why not ``concurrent.futures``."""

    name = "process"

    def __init__(self, workers: int = 2, threads: int | None = None, max_retries: int = 2,
                 candidate_timeout_s: float | None = None) -> None:
        if workers < 1:
            raise UserError(f"search.workers: must be >= 1 for the process executor (got {workers})")
        if max_retries < 0:
            raise UserError(f"executor max_retries: must be >= 0 (got {max_retries})")
        if candidate_timeout_s is not None and not candidate_timeout_s > 0:
            raise UserError(f"search.candidate_timeout_s: must be > 0 or null (got {candidate_timeout_s})")
        self.workers = int(workers)
        self._threads = int(threads) if threads is not None else default_threads(self.workers)
        self.max_retries = int(max_retries)
        self.candidate_timeout_s = candidate_timeout_s
        self._pool: SupervisedPool | None = None

    @property
    def threads(self) -> int | None:
        return self._threads

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers, "threads_per_worker": self._threads,
                "candidate_timeout_s": self.candidate_timeout_s}

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [] if self._pool is None else self._pool.pids()

    def map_candidates(self, tasks: Sequence[CandidateTask]) -> Iterator[tuple[CandidateTask, EvaluationResult]]:
        """Run ``tasks`` on the workers, yielding results as they complete; a candidate whose worker dies is
        retried (only that candidate: each worker holds one), then reported failed."""
        if self._pool is None:
            self._pool = SupervisedPool(self.workers, set_worker_threads, (self._threads,),
                                        job_timeout_s=self.candidate_timeout_s)
        pending = [self.prepare(task) for task in tasks]
        for index, result in self._pool.run(run_task, pending, max_retries=self.max_retries):
            yield pending[index], _outcome_of(result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _outcome_of(result: JobResult) -> EvaluationResult:
    """A worker-pool result as the candidate's outcome; a ``UserError`` raised in a worker stops the search."""
    if result.kind == "ok":
        return result.value
    if result.kind == "error":
        if isinstance(result.value, UserError):
            raise UserError(str(result.value))
        return EvaluationResult.failure(f"{type(result.value).__name__}: {result.value}")
    if result.kind == "timeout":
        return EvaluationResult.failure(f"candidate timed out: {result.message}")
    return EvaluationResult.failure(result.message)


def _reload_ray_auth_config() -> None:
    """Make an already imported Ray re-read ``RAY_AUTH_*`` from the environment (what Ray itself does when
    it enables token authentication for a new local cluster)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: it reads the environment when the node starts
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class RayExecutor(Executor):
    """Candidates as Ray tasks on a local instance or an existing cluster; see the module docstring."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus_per_task: float = 1.0,
        num_gpus_per_task: float = 0.0,
        max_retries: int = 2,
        run_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        threads: int | None = None,
        executor_retries: int = 1,
        candidate_timeout_s: float | None = None,
        poll_s: float = 1.0,
    ) -> None:
        if num_cpus_per_task < 0 or num_gpus_per_task < 0:
            raise UserError(
                f"ray resources per task: must be >= 0 (got num_cpus={num_cpus_per_task}, num_gpus={num_gpus_per_task})"
            )
        if max_retries < 0 or executor_retries < 0:
            raise UserError(f"ray retries: must be >= 0 (got max_retries={max_retries}, executor_retries={executor_retries})")
        if workers is not None and workers < 1:
            raise UserError(f"search.workers: must be >= 1 (got {workers})")
        self.address = address or None
        self.num_cpus_per_task = float(num_cpus_per_task)
        self.num_gpus_per_task = float(num_gpus_per_task)
        self.max_retries = int(max_retries)
        self.executor_retries = int(executor_retries)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if candidate_timeout_s is not None and not candidate_timeout_s > 0:
            raise UserError(f"search.candidate_timeout_s: must be > 0 or null (got {candidate_timeout_s})")
        self.workers = workers
        self.candidate_timeout_s = candidate_timeout_s
        self.poll_s = float(poll_s)
        self._threads = int(threads) if threads is not None else max(1, int(self.num_cpus_per_task))
        self._ray: Any = None
        self._remote: Any = None
        self._owns_instance = False
        self._saved_env: dict[str, str | None] = {}
        self.temp_dir: Path | None = None

    @property
    def threads(self) -> int | None:
        return self._threads

    def describe(self) -> dict[str, Any]:
        return {
            "executor": self.name, "address": self.address or "local", "workers": self.workers,
            "num_cpus_per_task": self.num_cpus_per_task, "num_gpus_per_task": self.num_gpus_per_task,
            "max_retries": self.max_retries, "temp_dir": None if self.temp_dir is None else str(self.temp_dir),
        }

    # -- start / stop ------------------------------------------------------------------------------------

    def _set_env(self, name: str, value: str) -> None:
        if name not in self._saved_env:
            self._saved_env[name] = os.environ.get(name)
        os.environ[name] = value

    def _restore_env(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def _local_temp_dir(self) -> Path:
        """``<run_dir>/ray``, or a short ``/tmp`` folder symlinked there when that path is too long."""
        if self.run_dir is None:
            return Path(tempfile.mkdtemp(prefix="nasfcos-ray-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        link = self.run_dir.resolve() / "ray"
        if link.is_symlink() and link.resolve().is_dir():
            target = link.resolve()
            if len(str(target)) <= RAY_TEMP_DIR_MAX_CHARS:
                return target
        if len(str(link)) <= RAY_TEMP_DIR_MAX_CHARS and not link.is_symlink():
            link.mkdir(exist_ok=True)
            return link
        short = Path(tempfile.mkdtemp(prefix="nasfcos-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        if link.is_symlink() or not link.exists():
            if link.is_symlink():
                link.unlink()
            link.symlink_to(short, target_is_directory=True)
        (self.run_dir / "ray_temp_dir.txt").write_text(f"{short}\n", encoding="utf-8")
        return short

    def _start(self) -> None:
        if self._remote is not None:
            return
        import importlib.util
        import sys

        if importlib.util.find_spec("ray") is None:
            raise UserError("search.executor=ray: the 'ray' package is not installed (pip install 'nasfcos[ray]')")
        local = self.address is None and not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
        if local:
            # Loopback only (see the module docstring) and a private token instead of ~/.ray/auth_token. Set
            # before Ray reads its configuration (at import), and re-read below if it was imported earlier.
            self._set_env("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            self._set_env("RAY_AUTH_MODE", "token")
            self._set_env("RAY_AUTH_TOKEN", secrets.token_hex(32))
        already_imported = "ray" in sys.modules
        import ray

        self._ray = ray
        if not ray.is_initialized():
            if local:
                self.temp_dir = self._local_temp_dir()
                if already_imported:
                    _reload_ray_auth_config()
                import ray._private.ray_constants as ray_constants

                saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
                ray_constants.ENABLE_RAY_CLUSTER = False
                try:
                    ray.init(
                        address=None,
                        num_cpus=self.workers,
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        _temp_dir=str(self.temp_dir),
                        log_to_driver=False,
                        logging_level="warning",
                    )
                except BaseException:
                    self._restore_env()
                    raise
                finally:
                    ray_constants.ENABLE_RAY_CLUSTER = saved_cluster_flag
            else:
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level="warning")
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise UserError(f"search.ray_address: cannot join Ray cluster {self.address!r} ({exc})") from None
            self._owns_instance = True
        self._remote = ray.remote(
            num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus_per_task, max_retries=self.max_retries,
        )(run_task)

    def close(self) -> None:
        """Shut down the local Ray instance (or disconnect from the cluster) and restore the environment."""
        if self._ray is not None and self._owns_instance and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_instance = False
        self._remote = None
        self._restore_env()

    # -- running -----------------------------------------------------------------------------------------

    def map_candidates(self, tasks: Sequence[CandidateTask]) -> Iterator[tuple[CandidateTask, EvaluationResult]]:
        self._start()
        ray = self._ray
        from ray.exceptions import RayError

        refs: dict[Any, tuple[CandidateTask, int, float]] = {}
        for task in tasks:
            task = self.prepare(task)
            refs[self._remote.remote(task)] = (task, 0, time.monotonic())
        try:
            while refs:
                # Never an unbounded wait: wake up to enforce the candidate deadline.
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self._wait_timeout(refs))
                for ref in ready:
                    task, extra, _started = refs.pop(ref)
                    try:
                        outcome = ray.get(ref, timeout=self.poll_s * 60)
                    except RayError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, UserError):
                            raise UserError(str(cause)) from None
                        if extra < self.executor_retries:
                            refs[self._remote.remote(task)] = (task, extra + 1, time.monotonic())
                            continue
                        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        outcome = EvaluationResult.failure(f"{type(exc).__name__}: {first_line}")
                    yield task, outcome
                for ref, (task, _extra, started) in list(self._overdue(refs).items()):
                    refs.pop(ref)
                    ray.cancel(ref, force=True)
                    yield task, EvaluationResult.failure(f"candidate timed out: ran longer than {self.candidate_timeout_s:g} s; "
                                               "its Ray task was cancelled")
        except GeneratorExit:
            for ref in refs:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or the instance is gone
                    pass
            raise

    def _wait_timeout(self, refs: dict[Any, tuple[CandidateTask, int, float]]) -> float:
        if self.candidate_timeout_s is None:
            return self.poll_s * 10
        now = time.monotonic()
        first_deadline = min(started + self.candidate_timeout_s for _, _, started in refs.values())
        return max(0.0, min(self.poll_s * 10, first_deadline - now))

    def _overdue(self, refs: dict[Any, tuple[CandidateTask, int, float]]) -> dict[Any, tuple[CandidateTask, int, float]]:
        if self.candidate_timeout_s is None:
            return {}
        now = time.monotonic()
        return {ref: entry for ref, entry in refs.items() if now - entry[2] > self.candidate_timeout_s}


def build_executor(
    name: str,
    *,
    workers: int | None = None,
    threads: int | None = None,
    evaluator: Callable[..., Any] | None = None,
    ray_address: str | None = None,
    ray_num_cpus_per_task: float = 1.0,
    ray_num_gpus_per_task: float = 0.0,
    max_retries: int = 2,
    run_dir: str | os.PathLike[str] | None = None,
    candidate_timeout_s: float | None = None,
) -> Executor:
    """An executor by name (``inline``, ``process``, ``ray``); unknown names are a :class:`UserError`.

    ``workers=None``: one process per core for ``process``; all the machine's CPUs for a local Ray instance.
    """
    if name == "inline":
        return InlineExecutor(evaluator)
    if name == "process":
        return ProcessExecutor(workers=workers or os.cpu_count() or 1, threads=threads, max_retries=max_retries,
                               candidate_timeout_s=candidate_timeout_s)
    if name == "ray":
        return RayExecutor(
            address=ray_address, num_cpus_per_task=ray_num_cpus_per_task, num_gpus_per_task=ray_num_gpus_per_task,
            max_retries=max_retries, run_dir=run_dir, workers=workers, threads=threads,
            candidate_timeout_s=candidate_timeout_s,
        )
    raise UserError(f"search.executor: unknown executor (got {name!r}); expected one of {', '.join(EXECUTORS)}")
