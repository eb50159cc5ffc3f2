"""The worker side of the search: evaluate one candidate, in whatever process or machine it lands on.

Every executor (same process, a process pool, Ray) ships the same picklable :class:`CandidateTask` to
:func:`run_task` and gets back the same picklable
:class:`~nasfcos.search.results.EvaluationResult`, so the search loop does not care
where a candidate ran. What travels is small: the genotype as JSON, the proxy config, the *path* of the
feature cache (workers open it memory-mapped themselves; arrays are never shipped) and the evaluator as a
``"module:function"`` string, resolved inside the worker. The string form is what lets a Ray worker on
another machine, or a freshly spawned process, find the function: a pickled function object would need its
module importable *before* the task's arguments are unpickled.

An evaluator is a function ``evaluator(genotype, cache, cfg, *, seed, early_stop_reference=None)`` or simply
``evaluator(genotype)`` (:mod:`nasfcos.search.evaluator` says which call a function gets) returning an
:class:`~nasfcos.search.results.EvaluationResult`, a float reward, or a dict or object with the record's field
names (normalised by :func:`~nasfcos.search.results.as_result`); the default is
:func:`nasfcos.search.proxy.evaluate_candidate`. ``cache_path`` is ``None`` when a run has no cache (an
evaluator of its own needs none). :func:`run_task` never raises for a candidate's failure: an
exception inside the evaluator becomes ``status="failed"`` with the error text, so one broken architecture
(NaN, out of memory, a bug in an op) cannot stop a search of thousands. A :class:`~nasfcos.errors.UserError`
(an unusable cache, an unknown device) is the exception: it would fail every candidate alike, so it propagates
and stops the search with its one-line message.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nasfcos.errors import UserError
from nasfcos.search.config import ProxyConfig
from nasfcos.search.evaluator import (
    DEFAULT_EVALUATOR,
    add_python_path,
    call_evaluator,
    describe_exception,
    evaluator_spec,
    resolve_evaluator,
)
from nasfcos.search.results import EvaluationResult, as_result

__all__ = [
    "DEFAULT_EVALUATOR",
    "CandidateTask",
    "candidate_seed",
    "evaluator_spec",
    "resolve_evaluator",
    "run_task",
    "set_worker_threads",
]


@dataclass(frozen=True)
class CandidateTask:
    """One candidate to evaluate, as shipped to a worker.

    ``index`` is the candidate's position in its batch (proposal order); ``key`` its ``Genotype.key()``;
    ``seed`` the per-candidate seed (:func:`candidate_seed`: a function of the search seed and the key, so a
    genotype gets the same training run whenever and wherever it is evaluated). ``python_path``: folders a
    worker puts on ``sys.path`` before resolving ``evaluator`` (for evaluators outside installed packages,
    e.g. tests). ``threads``: ``torch.set_num_threads`` in the worker (``None`` = leave it).
    """

    index: int
    key: str
    genotype_json: str
    actions: tuple[int, ...]
    seed: int
    cache_path: str | None
    proxy_cfg: ProxyConfig | None
    evaluator: str | None = DEFAULT_EVALUATOR
    early_stop_reference: dict[str, Any] | None = None
    python_path: tuple[str, ...] = ()
    threads: int | None = None


def candidate_seed(search_seed: int, key: str) -> int:
    """The training seed of a candidate: a function of the search seed and the genotype only, so a genotype
    gets the same proxy run whatever batch, worker or restart it lands in."""
    digest = hashlib.sha1(f"{int(search_seed)}:{key}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ running


def set_worker_threads(threads: int | None) -> None:
    """Limit intra-op threads in a worker: environment first (read when torch/OpenMP start), torch if loaded."""
    if threads is None:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_task(task: CandidateTask, evaluator: Callable[..., Any] | None = None) -> EvaluationResult:
    """Evaluate ``task`` and normalise the result; never raises for the candidate's own failure.

    ``evaluator`` (a callable) overrides ``task.evaluator`` (a spec string); the in-process executor uses it
    for functions that cannot be named by a string.
    """
    start = time.perf_counter()
    try:
        add_python_path(task.python_path)
        set_worker_threads(task.threads)
        if evaluator is None:
            if task.evaluator is None:
                raise UserError("evaluator: none given for a task run outside the search process")
            evaluator = resolve_evaluator(task.evaluator)
        from nasfcos.space.genotype import Genotype

        genotype = Genotype.from_json(task.genotype_json)
        set_worker_threads(task.threads)  # again: the evaluator's import may have started torch
        result = call_evaluator(evaluator, genotype, task.cache_path, task.proxy_cfg, seed=task.seed,
                                early_stop_reference=task.early_stop_reference)
    except UserError:
        raise  # the user's mistake (unusable cache, unknown device): it would fail every candidate alike
    except Exception as exc:  # a candidate's failure is data, not a crash of the search
        return EvaluationResult.failure(describe_exception(exc), time.perf_counter() - start)
    return as_result(result, time.perf_counter() - start)
