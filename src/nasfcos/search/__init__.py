"""The search the paper describes and never released: LSTM controller + PPO (or random search), the proxy task
on cached features with Polyak averaging and a loss reward, a SQLite results store, inline/process/Ray
executors and the kill-safe search loop (:func:`nasfcos.search.loop.run_search`). One record per evaluation
(:class:`nasfcos.search.results.EvaluationResult`) and every setting (:mod:`nasfcos.search.config`) are
torch-free; ``docs/architecture.md`` has the module map."""
