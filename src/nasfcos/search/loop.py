"""The architecture search loop (NAS-FCOS Sec. 3.3): propose, evaluate in parallel, learn, checkpoint, repeat.

One iteration ("batch", one policy update), as :func:`run_search` reads::

    batch = plan a batch                        # strategy.propose(batch_size): same RNG state => same proposals
        known genotypes (by Genotype.key()) -> their stored reward is reused, nothing is trained again
        new genotypes (at most the remaining budget) -> tasks, except those already stored by this batch
    evaluate: executor.map_candidates(tasks)    # in completion order
        record each result the moment it completes: its own SQLite transaction, then the candidate/ log line
    update: strategy.observe(all rewarded proposals, in proposal order); fold the early-stop losses in;
        store.commit_step(state=strategy + loop state)    # one transaction
    log the update/ line and rewrite topk/

until the store holds ``budget`` distinct evaluations. Re-proposals of known genotypes do not count toward the
budget (it counts *distinct* evaluations) but the controller still learns from them; ``max_proposals_factor``
bounds the loop when a converged controller keeps re-proposing what it already knows.

**Resume protocol (kill-safe at any moment).** The store's meta holds the strategy state (controller,
optimiser, baseline, PPO buffer, RNG) and the loop state (update step, proposal count, early-stop reference)
as of the last completed batch; every stored result carries ``controller_step`` = the update step of the
batch that produced it. On ``resume=True`` the loop restores both, re-proposes the interrupted batch (the
restored RNG gives exactly the same proposals), takes the results of that batch that are already in the store
(``controller_step`` equal to the current step) and evaluates only the others. Nothing is lost or evaluated
twice, the total is exactly ``budget``, and with a deterministic evaluator the genotypes, rewards and final
search state equal those of an uninterrupted run with the same seed (with the inline executor the store's
order is the proposal order; parallel executors store a batch in completion order). A kill during the policy
update or the commit just redoes the update from the same inputs. The resolved config (``config.yaml``) must
match on resume except for the keys in :data:`~nasfcos.search.config.RESUMABLE_KEYS` (budget, executor and
resources), which only change how much or where.

**Failures.** A candidate that fails (exception, NaN, a dead worker after its retries) is stored with
``status="failed"``, its error text and a penalty reward, and the search goes on. The penalty is
``search.failure_reward`` if set, else ``proxy.failure_reward`` if set; otherwise the worst non-failed
reward of the *earlier* batches minus ``search.failure_margin`` (committed results only, so it does not depend
on the completion order inside a batch and is the same after a resume), and ``search.initial_failure_reward``
while no earlier batch has a reward (pick a value below any plausible reward: the default -10 suits the
``-loss`` reward; use e.g. -0.1 with ``reward: ap``).

**Early stopping of hopeless candidates.** With ``proxy.early_stop`` the loop keeps an
:class:`~nasfcos.search.early_stop.EarlyStopReference` (a running average of candidates' early-epoch
validation loss). Every candidate of a batch gets the reference committed with the previous batch; when the
batch is complete the new candidates' ``early_stop_loss`` values are folded in, in proposal order, and the
result is committed with the strategy state. Each candidate's ``early_stop_loss`` is a field of its stored
:class:`~nasfcos.search.results.EvaluationResult`, written in the same transaction as the rest of it, so a
resumed batch folds in exactly the same values.

**Cost-aware reward (optional, off by default).** With ``search.cost_reward.enabled`` each evaluation's reward
is made cost-aware as it arrives, before it is stored or handed to the strategy
(:mod:`nasfcos.search.cost_reward`; the raw reward stays in ``metrics.raw_reward``). A ``null`` target is
``target_arch``'s cost measured once when the run starts and kept in the store, so a resumed run ranks with
the same number.

Outputs in the run folder (:mod:`nasfcos.search.run_folder`): ``config.yaml``, ``store.sqlite``, ``log.jsonl``
and ``tensorboard/`` (``candidate/*`` per evaluation, ``update/*`` per policy update) and ``topk/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasfcos.errors import UserError
from nasfcos.search.config import CostRewardConfig, SearchRunConfig, build_search_space
from nasfcos.search.cost_reward import apply_cost_reward, check_cost_reward, resolve_cost_reward
from nasfcos.search.early_stop import EarlyStopReference
from nasfcos.search.executors import Executor, build_executor
from nasfcos.search.results import EvaluationResult
from nasfcos.search.evaluator import RunEvaluator, resolve_run_evaluator
from nasfcos.search.run_folder import STORE_FILE, TOPK_DIR, check_cache, prepare_run_dir, resolve_cache, write_topk
from nasfcos.search.runner import CandidateTask, candidate_seed
from nasfcos.search.store import CandidateRecord, ResultStore

__all__ = ["LOOP_STATE_KEY", "SearchSummary", "candidate_seed", "run_search"]

#: store meta key of the loop's own state (JSON), committed together with the strategy state.
LOOP_STATE_KEY = "loop_state"


# --------------------------------------------------------------------------------------------------------------
# The loop's state
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """What the loop commits with the strategy state (JSON in the store's meta)."""

    step: int = 0  # policy updates done = index of the batch being worked on
    proposals: int = 0  # proposals drawn in completed batches
    repeats: int = 0  # proposals whose genotype was already evaluated
    early_stop_reference: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> _LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in names}) if text is not None else cls()


@dataclass(frozen=True)
class SearchSummary:
    """What a finished (or stopped) search produced."""

    run_dir: Path
    evaluated: int  # distinct evaluations in the store
    failed: int
    pruned: int
    proposals: int
    repeats: int
    updates: int
    stop_reason: str  # "budget" or "proposal_limit"
    top: tuple[CandidateRecord, ...]
    topk_files: tuple[Path, ...]
    wall_time_s: float

    @property
    def best(self) -> CandidateRecord | None:
        return self.top[0] if self.top else None


@dataclass
class _Run:
    """Everything one call of :func:`run_search` works with. ``committed`` counts the results of completed
    batches (the budget spent); ``worst`` (their worst reward, for the failure penalty) and ``best`` (the best
    stored reward) are derived bookkeeping, recomputed from the store on resume."""

    run_dir: Path
    cfg: SearchRunConfig
    store: ResultStore
    strategy: Any
    executor: Executor
    logger: Any
    bar: Any
    state: _LoopState
    evaluator: RunEvaluator  # its spec and worker path go into every task
    committed: int = 0
    worst: float | None = None
    best: float | None = None
    cost_reward: CostRewardConfig = field(default_factory=CostRewardConfig)  # with its target resolved


@dataclass
class _Batch:
    """One batch in the making: its proposals, the rewards known so far (by key) and its new evaluations."""

    step: int
    proposals: list[Any]
    keys: list[str]
    penalty: float  # reward given to this batch's failures
    rewards: dict[str, float] = field(default_factory=dict)
    new_keys: list[str] = field(default_factory=list)  # this batch's distinct evaluations, in proposal order
    results: dict[str, CandidateRecord] = field(default_factory=dict)
    tasks: list[CandidateTask] = field(default_factory=list)
    repeats: int = 0
    observed: list[tuple[Any, float]] = field(default_factory=list)  # what the strategy learned from


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def run_search(
    run_dir: str | Path,
    cfg: SearchRunConfig,
    *,
    resume: bool = False,
    evaluator: Callable[..., Any] | str | None = None,
    python_path: Sequence[str] | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> SearchSummary:
    """Run (or, with ``resume=True``, continue) the search ``cfg`` describes into ``run_dir``; see the
    module docstring.

    ``evaluator``: how a candidate is scored; ``None`` = ``cfg.evaluator``, which is ``None`` for the proxy
    task (:func:`nasfcos.search.proxy.evaluate_candidate` on ``cfg.cache``). Otherwise a ``"module:function"``
    string or a function: ``fn(genotype) -> float | {"reward": ..., other metrics}`` or the full
    ``fn(genotype, cache, proxy_cfg, *, seed, early_stop_reference)`` (:mod:`nasfcos.search.evaluator` has the
    rule); process and Ray executors need an importable module-level function. The evaluator is recorded in
    ``config.yaml`` (``evaluator``): resuming with another one is a :class:`UserError`. With an evaluator of
    its own a run needs no cache. ``python_path``: folders to import the evaluator's module from (default
    ``cfg.python_path``), in this process and in every worker.
    ``executor``: an executor to use instead of the one ``cfg.search`` names (the caller closes it).
    ``progress``: show the progress bar (and the proxy's in-candidate lines) on stderr.
    """
    started = time.monotonic()
    with _open_run(Path(run_dir), cfg, resume, evaluator, python_path, executor, progress) as run:
        while (stop := _stop_reason(run)) is None:
            batch = _plan_batch(run)  # propose; reuse known rewards; tasks for the new genotypes
            for task, outcome in run.executor.map_candidates(batch.tasks):  # evaluate, in completion order
                _record(run, batch, task, outcome)  # store (one transaction each) and log
            stats = _update(run, batch)  # learn, then commit strategy + loop state (one transaction)
            _log_update(run, batch, stats)
        return _finish(run, stop, time.monotonic() - started)


@contextmanager
def _open_run(run_dir: Path, cfg: SearchRunConfig, resume: bool, evaluator: Callable[..., Any] | str | None,
              python_path: Sequence[str] | None, executor: Executor | None, progress: bool) -> Iterator[_Run]:
    """Check the settings, prepare the run folder, restore a resumed run's state, start the executor and the
    logs; close whatever was opened afterwards (an executor passed in is the caller's to close)."""
    from nasfcos.logs import ProgressBar, RunLogger
    from nasfcos.search.candidate_progress import candidate_progress
    from nasfcos.search.strategies import build_strategy

    if not isinstance(cfg, SearchRunConfig):
        raise TypeError(f"run_search(run_dir, cfg: SearchRunConfig, ...): got {type(cfg).__name__} for cfg")
    cfg, run_evaluator = resolve_run_evaluator(cfg, evaluator, python_path)
    using_proxy = cfg.evaluator is None
    cfg = resolve_cache(cfg, using_proxy)
    search = cfg.search
    if search.executor != "inline" and executor is None and run_evaluator.spec is None:
        raise UserError(
            f"search.executor={search.executor}: the evaluator must be an importable module-level function "
            "(a lambda or closure only runs with the inline executor)"
        )
    strategy = build_strategy(search.strategy, build_search_space(search.space), search.seed,
                              controller=search.controller, ppo=search.ppo)
    check_cost_reward(cfg, using_proxy)
    prepare_run_dir(run_dir, cfg, resume)
    store = ResultStore(run_dir / STORE_FILE)
    owned: list[Any] = []  # closed in reverse order
    restore_candidate_progress = candidate_progress(progress)  # the proxy's in-candidate lines, workers included
    try:
        check_cache(cfg, store, using_proxy)
        cost_reward = resolve_cost_reward(cfg, store, using_proxy)
        state = _restore(store, strategy, cfg)
        tally = _tally_stored(store, state)
        if executor is None:
            executor = build_executor(
                search.executor, workers=search.workers, threads=search.worker_threads,
                evaluator=run_evaluator.function, ray_address=search.ray_address,
                ray_num_cpus_per_task=search.ray_num_cpus_per_task, ray_num_gpus_per_task=search.ray_num_gpus_per_task,
                max_retries=search.max_retries, run_dir=run_dir, candidate_timeout_s=search.candidate_timeout_s)
            owned.append(executor)
        logger = RunLogger(run_dir, use_tensorboard=search.tensorboard)
        owned.append(logger)
        logger.log_event("resume" if resume else "start", step=state.step, evaluated=store.count(),
                         budget=search.budget, **executor.describe())
        if cost_reward.enabled:
            logger.log_event("cost_reward", metric=cost_reward.metric, target=cost_reward.target,
                             target_arch=cost_reward.target_arch, weight=cost_reward.weight)
        bar = ProgressBar(total=search.budget, initial=min(store.count(), search.budget), desc="search",
                          enabled=progress, text_every=1)
        owned.append(bar)
        yield _Run(run_dir, cfg, store, strategy, executor, logger, bar, state, run_evaluator, *tally,
                   cost_reward=cost_reward)
    finally:
        for thing in reversed(owned):
            thing.close()
        store.close()
        restore_candidate_progress()


def _restore(store: ResultStore, strategy: Any, cfg: SearchRunConfig) -> _LoopState:
    """The strategy and loop state of the last committed batch (a fresh state for a new run)."""
    from nasfcos.search.strategies import state_from_bytes

    blob = store.state_blob()
    if blob is None:
        reference = EarlyStopReference.for_config(cfg.proxy).to_dict() if cfg.proxy.early_stop else None
        return _LoopState(early_stop_reference=reference)
    state_from_bytes(strategy, blob)
    return _LoopState.from_json(store.get_meta(LOOP_STATE_KEY))


def _tally_stored(store: ResultStore, state: _LoopState) -> tuple[int, float | None, float | None]:
    """``(committed, worst, best)`` of :class:`_Run`, from what the store already holds."""
    rows = store.all()
    if any(r.controller_step is not None and r.controller_step > state.step for r in rows):
        raise UserError(f"{store.path}: results newer than the saved search state; the store is inconsistent")
    committed = [r for r in rows if r.controller_step is None or r.controller_step < state.step]
    return (len(committed), min((r.reward for r in committed if r.status != "failed"), default=None),
            max((r.reward for r in rows if r.status != "failed"), default=None))


def _stop_reason(run: _Run) -> str | None:
    """``"budget"`` or ``"proposal_limit"`` when the search is done, else ``None``."""
    search = run.cfg.search
    if run.committed >= search.budget:
        return "budget"
    if run.state.proposals >= int(search.max_proposals_factor * search.budget):
        run.bar.write(f"search: stopped after {run.state.proposals} proposals ({search.max_proposals_factor} x "
                      "budget): the strategy keeps proposing known genotypes")
        return "proposal_limit"
    return None


def _penalty(run: _Run) -> float:
    """The reward of this batch's failures: from committed results only (order-independent, resumable)."""
    search = run.cfg.search
    fixed = search.failure_reward if search.failure_reward is not None else run.cfg.proxy.failure_reward
    if fixed is not None:
        return fixed
    return run.worst - search.failure_margin if run.worst is not None else search.initial_failure_reward


def _plan_batch(run: _Run) -> _Batch:
    """Propose a batch and sort it, in one pass in proposal order: a genotype known from an earlier batch keeps
    its stored reward (a repeat), so does a second proposal within the batch; up to the remaining budget the
    others are this batch's new evaluations, and those not already stored by this batch become tasks."""
    proposals = run.strategy.propose(run.cfg.search.batch_size)
    batch = _Batch(run.state.step, proposals, [p.genotype.key() for p in proposals], _penalty(run))
    remaining = run.cfg.search.budget - run.committed
    for index, (proposal, key) in enumerate(zip(batch.proposals, batch.keys)):
        if key in batch.rewards or key in batch.new_keys:
            batch.repeats += 1
            continue
        row = run.store.get(key)
        if row is not None and (row.controller_step is None or row.controller_step < batch.step):
            batch.rewards[key] = row.reward
            batch.repeats += 1
        elif len(batch.new_keys) < remaining:
            batch.new_keys.append(key)
            if row is not None:  # evaluated in this batch before an interruption
                batch.results[key] = row
            else:
                batch.tasks.append(CandidateTask(
                    index=index, key=key, genotype_json=proposal.genotype.to_json(indent=None),
                    actions=tuple(proposal.actions), seed=candidate_seed(run.cfg.search.seed, key),
                    cache_path=run.cfg.cache, proxy_cfg=run.cfg.proxy, evaluator=run.evaluator.spec,
                    early_stop_reference=run.state.early_stop_reference, python_path=run.evaluator.worker_path,
                ))
    return batch


def _record(run: _Run, batch: _Batch, task: CandidateTask, outcome: EvaluationResult) -> None:
    """Store one result (its own transaction; a failure gets the batch's penalty, a success the cost term when
    it is on) and log it."""
    outcome = apply_cost_reward(outcome, run.cost_reward)
    if outcome.status == "failed":
        outcome = dataclasses.replace(outcome, reward=batch.penalty, error=outcome.error or "failed")
    record = CandidateRecord.of(task.key, task.genotype_json, task.actions, outcome, controller_step=batch.step)
    run.store.add(record)
    batch.results[task.key] = record
    if record.status != "failed":
        run.best = record.reward if run.best is None else max(run.best, record.reward)
    evaluated = run.committed + len(batch.results)
    scalars = {"reward": record.reward, "failed": float(record.status == "failed"),
               "pruned": float(record.status == "pruned"),
               **({"best_reward": run.best} if run.best is not None else {}), **record.scalars()}
    run.logger.log(evaluated, scalars, prefix="candidate")
    if record.status == "failed":
        run.logger.log_event("candidate_failed", step=evaluated, key=record.key, error=record.error,
                             penalty=record.reward)
    run.bar.update(min(evaluated, run.cfg.search.budget),
                   {**({"best": run.best} if run.best is not None else {}), "cand/h": run.bar.rate() * 3600})


def _update(run: _Run, batch: _Batch) -> dict[str, Any]:
    """Learn from the batch's rewarded proposals (in proposal order), fold its early-stop losses in and commit
    the strategy and loop state in one transaction; returns the strategy's statistics."""
    from nasfcos.search.strategies import state_to_bytes

    batch.rewards.update((key, batch.results[key].reward) for key in batch.new_keys)
    batch.observed = [(p, batch.rewards[k]) for p, k in zip(batch.proposals, batch.keys) if k in batch.rewards]
    stats = run.strategy.observe(batch.observed) if batch.observed else {}
    state = run.state
    if state.early_stop_reference is not None:
        reference = EarlyStopReference.from_dict(state.early_stop_reference)
        for key in batch.new_keys:
            reference.update(batch.results[key])
        state.early_stop_reference = reference.to_dict()
    state.step += 1
    state.proposals += len(batch.proposals)
    state.repeats += batch.repeats
    run.store.commit_step([], state_to_bytes(run.strategy), meta={LOOP_STATE_KEY: state.to_json()})
    # Bookkeeping for the next batch (derived, not state).
    run.committed += len(batch.new_keys)
    rewards = [batch.results[k].reward for k in batch.new_keys if batch.results[k].status != "failed"]
    run.worst = min(rewards + ([run.worst] if run.worst is not None else []), default=None)
    write_topk(run.run_dir / TOPK_DIR, run.store.top_k(run.cfg.search.top_k))
    return stats


def _log_update(run: _Run, batch: _Batch, stats: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    scalars.update({"evaluated": float(run.committed), "proposals": float(run.state.proposals),
                    "repeats": float(run.state.repeats), "batch_new": float(len(batch.new_keys))})
    if batch.observed:
        scalars["batch_reward_mean"] = sum(r for _, r in batch.observed) / len(batch.observed)
    if run.best is not None:
        scalars["best_reward"] = run.best
    run.logger.log(run.state.step, scalars, prefix="update")


def _finish(run: _Run, stop_reason: str, wall_time_s: float) -> SearchSummary:
    top = tuple(run.store.top_k(run.cfg.search.top_k))
    files = tuple(write_topk(run.run_dir / TOPK_DIR, list(top)))
    store = run.store
    summary = SearchSummary(
        run_dir=run.run_dir, evaluated=store.count(), failed=store.count("failed"), pruned=store.count("pruned"),
        proposals=run.state.proposals, repeats=run.state.repeats, updates=run.state.step, stop_reason=stop_reason,
        top=top, topk_files=files, wall_time_s=wall_time_s,
    )
    run.logger.log_event("finish", step=run.state.step, evaluated=summary.evaluated, failed=summary.failed,
                         stop_reason=stop_reason, best_reward=None if summary.best is None else summary.best.reward,
                         **run.executor.describe())
    return summary
