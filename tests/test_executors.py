"""Executors: in-process, a spawned process pool and Ray give the same results; dead workers are retried.

The Ray tests start a real local Ray instance (tens of seconds on a busy machine): ``pytest -m slow
tests/test_executors.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nasfcos.search.executors import InlineExecutor, ProcessExecutor, RayExecutor, build_executor
from nasfcos.search.results import as_result as outcome_from
from nasfcos.search.runner import CandidateTask, run_task
from test_search_loop import SMALL_SPACE, cache_dir, deterministic_evaluator, fake_reward, quick_cfg, run_cfg

HERE = str(Path(__file__).resolve().parent)
MARKER_ENV = "NASFCOS_TEST_DIE_MARKER_DIR"


def dies_once_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                        early_stop_reference: Any = None) -> dict[str, Any]:
    """Kills its worker process the first time it sees a genotype (marker file), succeeds afterwards."""
    marker = Path(os.environ[MARKER_ENV]) / genotype.key()
    if not marker.exists():
        marker.write_text("died once\n")
        os._exit(3)
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


def always_dies_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                          early_stop_reference: Any = None) -> dict[str, Any]:
    os._exit(4)


def raising_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                      early_stop_reference: Any = None) -> dict[str, Any]:
    raise MemoryError("CUDA out of memory (pretend)")


def make_tasks(count: int, evaluator: str = "test_search_loop:deterministic_evaluator") -> list[CandidateTask]:
    import random

    from nasfcos.search.config import build_search_space

    space = build_search_space(SMALL_SPACE)
    rng = random.Random(1)
    tasks, seen = [], set()
    while len(tasks) < count:
        genotype = space.sample(rng)
        if genotype.key() in seen:
            continue
        seen.add(genotype.key())
        tasks.append(CandidateTask(
            index=len(tasks), key=genotype.key(), genotype_json=genotype.to_json(indent=None),
            actions=tuple(space.encode(genotype)), seed=len(tasks), cache_path="/nonexistent", proxy_cfg=None,
            evaluator=evaluator, python_path=(HERE,),
        ))
    return tasks


def _by_key(pairs: Any) -> dict[str, Any]:
    return {task.key: outcome for task, outcome in pairs}


def test_outcome_normalisation() -> None:
    assert outcome_from({"status": "ok", "reward": float("nan")}).status == "failed"
    assert outcome_from({"status": "weird", "reward": 1.0}).status == "failed"
    assert outcome_from(object()).status == "failed"
    from nasfcos.search.results import EvaluationResult

    proxy = EvaluationResult(status="pruned", reward=-2.5, loss_cls=1.0, params=12, early_stop_loss=3.0)
    outcome = outcome_from(proxy)
    assert (outcome.status, outcome.reward, outcome.loss_cls, outcome.params, outcome.early_stop_loss) == (
        "pruned", -2.5, 1.0, 12, 3.0)


def test_inline_executor_and_exceptions() -> None:
    from nasfcos.space.genotype import Genotype

    tasks = make_tasks(3)
    results = _by_key(InlineExecutor().map_candidates(tasks))
    for task in tasks:
        assert results[task.key].status == "ok"
        assert results[task.key].reward == pytest.approx(fake_reward(Genotype.from_json(task.genotype_json)))
    failed = run_task(replace(tasks[0], evaluator="test_executors:raising_evaluator"))
    assert failed.status == "failed" and failed.error.startswith("MemoryError: CUDA out of memory")
    # A lambda runs in process only.
    outcome = next(iter(InlineExecutor(lambda g, c, p, *, seed, early_stop_reference=None: {"reward": seed})
                        .map_candidates([replace(tasks[0], evaluator=None, seed=9)])))[1]
    assert outcome.reward == 9.0


def test_process_executor_matches_inline_and_retries_dead_workers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER_ENV, str(tmp_path))
    tasks = make_tasks(4)
    inline = _by_key(InlineExecutor().map_candidates(tasks))
    dying = [replace(t, evaluator="test_executors:dies_once_evaluator") for t in tasks[:2]]
    broken = replace(tasks[2], evaluator="test_executors:always_dies_evaluator", key="x" * 40)
    raising = replace(tasks[3], evaluator="test_executors:raising_evaluator", key="y" * 40)
    with ProcessExecutor(workers=2, max_retries=1) as executor:
        assert executor.threads == max(1, (os.cpu_count() or 1) // 2)
        parallel = _by_key(executor.map_candidates(tasks))
        assert parallel == inline
        # Workers that die are replaced; the candidates are retried and succeed.
        retried = _by_key(executor.map_candidates(dying))
        assert {k: v.reward for k, v in retried.items()} == {t.key: inline[t.key].reward for t in dying}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.key for t in dying)
        # A candidate that always kills its worker is failed after the retries; the pool keeps working.
        results = _by_key(executor.map_candidates([broken, raising, tasks[0]]))
        assert results[broken.key].status == "failed" and "died" in results[broken.key].error
        assert results[raising.key].status == "failed" and "MemoryError" in results[raising.key].error
        assert results[tasks[0].key] == inline[tasks[0].key]


def test_search_with_process_executor_matches_inline(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="ppo", budget=6, batch_size=3)
    run_search_kwargs = {"evaluator": "test_search_loop:deterministic_evaluator", "progress": False}
    from nasfcos.search.loop import run_search
    from nasfcos.search.store import ResultStore

    run_search(tmp_path / "inline", run_cfg(cache_dir(tmp_path), cfg), **run_search_kwargs)
    run_search(tmp_path / "process", run_cfg(cache_dir(tmp_path), replace(cfg, executor="process", workers=2)),
               **run_search_kwargs)
    with ResultStore(tmp_path / "inline" / "store.sqlite", readonly=True) as a, \
            ResultStore(tmp_path / "process" / "store.sqlite", readonly=True) as b:
        # Within a batch the store order is completion order; per batch the sets and rewards are equal.
        rows_a = sorted((r.controller_step, r.key, r.reward) for r in a.all())
        rows_b = sorted((r.controller_step, r.key, r.reward) for r in b.all())
        assert rows_a == rows_b
        assert a.state_blob() == b.state_blob()


def test_unknown_executor_is_a_user_error() -> None:
    from nasfcos.errors import UserError

    with pytest.raises(UserError, match="unknown executor"):
        build_executor("slurm")


def test_ray_temp_dir_is_short_and_recorded(tmp_path: Path) -> None:
    long_run = tmp_path / ("r" * 80)
    executor = RayExecutor(run_dir=long_run)
    temp = executor._local_temp_dir()
    try:
        assert len(str(temp)) <= 40 and temp.is_dir()
        assert (long_run / "ray").is_symlink() and (long_run / "ray").resolve() == temp.resolve()
        assert (long_run / "ray_temp_dir.txt").read_text().strip() == str(temp)
        # Reused on resume.
        assert RayExecutor(run_dir=long_run)._local_temp_dir() == temp.resolve()
    finally:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


RAY_SCRIPT = r"""
import os, sys, json, subprocess
from pathlib import Path
sys.path.insert(0, {here!r})
from test_executors import make_tasks, MARKER_ENV
from dataclasses import replace
from nasfcos.search.executors import InlineExecutor, RayExecutor

run_dir = Path({run_dir!r})
os.environ[MARKER_ENV] = str(run_dir)
tasks = make_tasks(3)
inline = {{t.key: o for t, o in InlineExecutor().map_candidates(tasks)}}
executor = RayExecutor(run_dir=run_dir, workers=2, max_retries=2)
out = {{}}
try:
    results = {{t.key: o for t, o in executor.map_candidates(tasks)}}
    out["same_as_inline"] = results == inline
    dying = [replace(t, evaluator="test_executors:dies_once_evaluator") for t in tasks[:2]]
    retried = {{t.key: o for t, o in executor.map_candidates(dying)}}
    out["retried_ok"] = all(o.status == "ok" and o.reward == inline[k].reward for k, o in retried.items())
    out["markers"] = sorted(p.name for p in run_dir.iterdir() if len(p.name) == 40)
    out["dying_keys"] = sorted(t.key for t in dying)
    raising = replace(tasks[2], evaluator="test_executors:raising_evaluator")
    (_, failed), = list(executor.map_candidates([raising]))
    out["failed"] = [failed.status, failed.error]
    import ray
    out["node_ip"] = ray.nodes()[0]["NodeManagerAddress"]
    try:
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    except FileNotFoundError:
        listening = []
    out["ray_listen"] = [line.split()[3] for line in listening if "gcs_server" in line or "raylet" in line]
    out["temp_dir"] = str(executor.temp_dir)
finally:
    executor.close()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_ray_executor_local_instance(tmp_path: Path) -> None:
    """A local Ray instance: same results as inline, files under the run folder, loopback only, a worker
    that dies is retried. Run in a subprocess so that Ray's global state does not leak into other tests."""
    import json

    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join([HERE, *sys.path])}
    proc = subprocess.run([sys.executable, "-c", RAY_SCRIPT.format(here=HERE, run_dir=str(run_dir))],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["same_as_inline"]
    assert out["retried_ok"] and out["markers"] == out["dying_keys"]
    assert out["failed"][0] == "failed" and out["failed"][1].startswith("MemoryError")
    assert out["node_ip"] == "127.0.0.1"
    # Ray's servers listen on the loopback interface only.
    import shutil

    if shutil.which("ss"):
        assert out["ray_listen"]
    assert all(addr.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for addr in out["ray_listen"]), out["ray_listen"]
    # Ray's temp files and logs live in the run folder (directly, or via the recorded symlink).
    temp = Path(out["temp_dir"])
    assert temp == (run_dir / "ray").resolve()
    sessions = list(temp.glob("session_*/logs"))
    assert sessions and any(sessions[0].iterdir())
    assert not (home / ".ray").exists()  # no token or other files in the home folder
    if temp.is_relative_to("/tmp") and not temp.is_relative_to(tmp_path):
        shutil.rmtree(temp, ignore_errors=True)
