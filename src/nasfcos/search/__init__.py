"""The search the paper describes and never released: LSTM controller + PPO (or random search), the proxy task
on cached features with Polyak averaging and a loss reward, a SQLite results store, inline/process/Ray
executors and the kill-safe search loop (:func:`nasfcos.search.loop.run_search`). One record per evaluation
(:class:`nasfcos.search.results.EvaluationResult`) and every setting (:mod:`nasfcos.search.config`) are
torch-free; ``docs/architecture.md`` has the module map.

The public entry points are importable from here (lazily: ``import nasfcos.search`` stays torch-free):
``run_search``, ``load_search_run_config``, ``SearchRunConfig``, ``EvaluationResult`` and, to score candidates
with a function of your own, ``load_evaluator`` / ``Evaluator`` (:mod:`nasfcos.search.evaluator`)."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "run_search": "nasfcos.search.loop",
    "SearchSummary": "nasfcos.search.loop",
    "load_search_run_config": "nasfcos.search.config",
    "SearchRunConfig": "nasfcos.search.config",
    "EvaluationResult": "nasfcos.search.results",
    "load_evaluator": "nasfcos.search.evaluator",
    "Evaluator": "nasfcos.search.evaluator",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nasfcos.search' has no attribute {name!r}")
