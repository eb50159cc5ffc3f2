"""Bring your own evaluator: score candidates with any function instead of the proxy task (torch-free).

A search asks one question per candidate: *how good is this genotype?* The built-in answer is the proxy task
(:func:`nasfcos.search.proxy.evaluate_candidate`: train the decoder briefly on cached features). A user's
answer is any importable function, named by a ``"module:function"`` spec (``nasfcos search --evaluator
my_objectives:score --python-path src``, ``run_search(..., evaluator="my_objectives:score")``)::

    def score(genotype: nasfcos.Genotype) -> float | Mapping[str, float]:
        ...

It returns the reward (higher is better) or a mapping with ``"reward"``; the mapping's other numeric keys are
kept as the record's ``metrics`` (stored, logged as ``candidate/metrics/<name>``, listed in ``topk.json``) and
the names of :class:`~nasfcos.search.results.EvaluationResult` fields (``ap``, ``gmacs``, ``params``...) fill
those fields. Anything else (an exception, ``NaN``, a string, ``None``) makes the candidate ``failed``, exactly
like a proxy run that diverged: the search stores it with a penalty reward and goes on.

**Which call a function gets** (:func:`evaluator_kind`): the search's internal signature is
``(genotype, cache, proxy_cfg, *, seed, early_stop_reference)`` (the proxy task, and evaluators that want the
cache path, the proxy settings or the per-candidate seed). A function whose signature accepts that call is
called that way (``"full"``); any other function is called as ``function(genotype)`` (``"genotype"``). So a
plain one-argument objective just works, and the proxy and the evaluators written for it keep working. A
function whose signature cannot be read (some builtins) is treated as ``"genotype"``.

Why a spec string and not a function object: the string is what a freshly spawned worker process or a Ray
worker on another machine can resolve (after putting ``python_path`` on ``sys.path``); the run's
``config.yaml`` records it, so ``--resume`` uses the same evaluator and refuses a different one.

:func:`load_evaluator` is the public entry: it resolves and checks a spec the way the search does (a bad spec
is a one-line :class:`~nasfcos.errors.UserError`) and returns an :class:`Evaluator` that scores one genotype
and returns the record the search would store, so an objective can be tried before a long search.
:func:`resolve_run_evaluator` is the search's side: it settles which evaluator a run uses (argument or
config), what ``config.yaml`` records and which folders a worker needs on ``sys.path`` to import it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from nasfcos.errors import UserError
from nasfcos.search.results import EvaluationResult, as_result

if TYPE_CHECKING:
    from nasfcos.search.config import SearchRunConfig

__all__ = [
    "DEFAULT_EVALUATOR",
    "Evaluator",
    "RunEvaluator",
    "EvaluatorKind",
    "add_python_path",
    "call_evaluator",
    "describe_exception",
    "evaluator_kind",
    "evaluator_spec",
    "load_evaluator",
    "module_root",
    "resolve_evaluator",
    "resolve_run_evaluator",
]

#: The real proxy task (``nasfcos.search.proxy.evaluate_candidate``).
DEFAULT_EVALUATOR = "nasfcos.search.proxy:evaluate_candidate"

#: ``"full"``: called as ``fn(genotype, cache, proxy_cfg, seed=..., early_stop_reference=...)``;
#: ``"genotype"``: called as ``fn(genotype)``.
EvaluatorKind = Literal["full", "genotype"]


def add_python_path(paths: Sequence[str]) -> None:
    """Put ``paths`` (in order) at the front of ``sys.path``; folders that do not exist are skipped."""
    for path in reversed(tuple(paths)):
        path = os.path.abspath(path)
        if path not in sys.path and os.path.isdir(path):
            sys.path.insert(0, path)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_exception(exc: BaseException) -> str:
    """``"Type: message [at file:line in fn <- ...]"`` (the innermost three frames): a failed candidate's
    ``error``, one line that says where the evaluator broke."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    text = f"{type(exc).__name__}: {exc}".strip()
    return f"{text} [at {where}]" if where else text


def resolve_evaluator(spec: str, python_path: Sequence[str] = ()) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (after putting ``python_path`` on ``sys.path``); a malformed spec,
    a module that cannot be imported, a missing attribute or one that is not callable is a one-line
    :class:`UserError`."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UserError(f"evaluator: expected 'module:function' (got {spec!r})")
    add_python_path(python_path)
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"; python path {list(python_path)}" if python_path else "; add its folder with --python-path"
        raise UserError(f"evaluator {spec}: cannot import module {module_name!r} ({_first_line(exc)}{where})") \
            from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise UserError(f"evaluator {spec}: importing module {module_name!r} failed ({_first_line(exc)})") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"evaluator {spec}: module {module_name!r} has no attribute {qualname!r}")
    if not callable(obj):
        raise UserError(f"evaluator {spec}: {qualname!r} is not callable (got {type(obj).__name__})")
    return obj


def evaluator_spec(evaluator: Callable[..., Any] | str) -> str | None:
    """The ``"module:function"`` string of an importable function (``None`` for a lambda or closure, which
    only the in-process executor can run)."""
    if isinstance(evaluator, str):
        resolve_evaluator(evaluator)
        return evaluator
    module = getattr(evaluator, "__module__", None)
    qualname = getattr(evaluator, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    spec = f"{module}:{qualname}"
    try:
        return spec if resolve_evaluator(spec) is evaluator else None
    except UserError:
        return None


def evaluator_kind(function: Callable[..., Any]) -> EvaluatorKind:
    """``"full"`` if ``function`` accepts ``(genotype, cache, proxy_cfg, *, seed=, early_stop_reference=)``,
    else ``"genotype"`` (see the module docstring)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a readable signature
        return "genotype"
    try:
        signature.bind(None, None, None, seed=0, early_stop_reference=None)
    except TypeError:
        return "genotype"
    return "full"


def call_evaluator(function: Callable[..., Any], genotype: Any, cache: str | None = None, proxy_cfg: Any = None,
                   *, seed: int = 0, early_stop_reference: Any = None) -> Any:
    """Call ``function`` the way its kind (:func:`evaluator_kind`) says; returns what it returned."""
    if evaluator_kind(function) == "full":
        return function(genotype, cache, proxy_cfg, seed=seed, early_stop_reference=early_stop_reference)
    return function(genotype)


@dataclass(frozen=True)
class Evaluator:
    """A resolved evaluator (from :func:`load_evaluator`): ``spec`` (``"module:function"``), the function, its
    :func:`kind <evaluator_kind>` and the ``python_path`` it was found on."""

    spec: str
    function: Callable[..., Any]
    kind: EvaluatorKind
    python_path: tuple[str, ...] = ()

    def __call__(self, genotype: Any, cache: str | None = None, proxy_cfg: Any = None, *, seed: int = 0,
                 early_stop_reference: Any = None) -> EvaluationResult:
        """Score ``genotype`` and return the record the search would store: an exception, ``NaN`` or an
        unusable answer gives ``status="failed"`` with the reason (a :class:`UserError` propagates)."""
        start = time.perf_counter()
        try:
            value = call_evaluator(self.function, genotype, cache, proxy_cfg, seed=seed,
                                   early_stop_reference=early_stop_reference)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a candidate's failure is data
            return EvaluationResult.failure(describe_exception(exc), time.perf_counter() - start)
        return as_result(value, time.perf_counter() - start)


def load_evaluator(spec: str, python_path: Sequence[str] = ()) -> Evaluator:
    """Resolve ``spec`` (``"module:function"``) after putting ``python_path`` on ``sys.path``, the way
    ``nasfcos search --evaluator SPEC --python-path DIR`` does; a bad spec is a one-line :class:`UserError`.

    >>> score = load_evaluator("known_rewards:dcn_concat_share", ["tests"])     # doctest: +SKIP
    >>> score(nasfcos.PRESETS["nas-fcos"].genotype).reward                       # doctest: +SKIP
    """
    paths = tuple(os.path.abspath(p) for p in python_path)
    for given, path in zip(python_path, paths):
        if not os.path.isdir(path):
            raise UserError(f"--python-path {given}: not a folder ({path})")
    function = resolve_evaluator(spec, paths)
    return Evaluator(spec, function, evaluator_kind(function), paths)


def module_root(spec: str) -> str | None:
    """The ``sys.path`` folder a spec's module was imported from in this process (``None`` if unknown)."""
    module_name = spec.partition(":")[0]
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    depth = module_name.count(".") + (1 if os.path.basename(path) == "__init__.py" else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


@dataclass(frozen=True)
class RunEvaluator:
    """A search run's evaluator, resolved once in the search process (:func:`resolve_run_evaluator`).

    ``function`` is what this process calls; ``spec`` is the ``"module:function"`` workers resolve (``None``
    for a lambda or closure, which only the inline executor can run); ``worker_path`` is the run's python path
    plus the folder the spec's module was imported from here, so a spawned or remote worker finds it too."""

    function: Callable[..., Any]
    spec: str | None
    worker_path: tuple[str, ...]


def resolve_run_evaluator(cfg: SearchRunConfig, evaluator: Callable[..., Any] | str | None,
                          python_path: Sequence[str] | None) -> tuple[SearchRunConfig, RunEvaluator]:
    """``(cfg with the evaluator and python path recorded, the resolved evaluator)`` for ``run_search``.

    ``evaluator`` / ``python_path`` override ``cfg.evaluator`` / ``cfg.python_path`` (``None`` = the config's).
    The recorded ``cfg.evaluator`` is ``None`` for the proxy task, the spec of an importable function, and
    ``module:qualname`` of one that is not (a lambda or closure: such a run resumes only when given the same
    function again); recording it is what lets ``--resume`` refuse a different evaluator. A bad spec, or an
    evaluator argument that contradicts the config, is a :class:`UserError`, raised before anything is
    created."""
    paths = tuple(os.path.abspath(p) for p in (cfg.python_path if python_path is None else python_path))
    chosen = evaluator if evaluator is not None else cfg.evaluator
    spec: str | None
    if chosen is None or chosen == DEFAULT_EVALUATOR:
        function, spec = resolve_evaluator(DEFAULT_EVALUATOR), DEFAULT_EVALUATOR
    elif isinstance(chosen, str):
        function, spec = load_evaluator(chosen, paths).function, chosen
    else:
        add_python_path(paths)
        function, spec = chosen, evaluator_spec(chosen)
    recorded = spec if spec is not None else (
        f"{getattr(chosen, '__module__', None) or '?'}:{getattr(chosen, '__qualname__', type(chosen).__name__)}")
    recorded = None if recorded == DEFAULT_EVALUATOR else recorded
    if evaluator is not None and cfg.evaluator is not None and recorded != cfg.evaluator:
        raise UserError(f"evaluator: run_search(evaluator=...) names {recorded!r} but the config has "
                        f"{cfg.evaluator!r}; give one of them")
    roots = [module_root(spec)] if spec else []
    worker_path = tuple(dict.fromkeys([*paths, *(p for p in roots if p)]))
    return replace(cfg, evaluator=recorded, python_path=paths), RunEvaluator(function, spec, worker_path)
