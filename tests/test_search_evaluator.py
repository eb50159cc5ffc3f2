"""Bring your own evaluator: ``nasfcos search --evaluator MODULE:FUNCTION [--python-path DIR]`` and the Python API.

The evaluators are user-style functions of one Genotype (``tests/evaluator_plugins.py``, rewards from
``tests/known_rewards.py``), run through the real command line (``nasfcos.cli.main`` in-process, or a real
``python -m nasfcos.cli`` process that is SIGKILLed and resumed). What is checked against independent truth:
the stored rewards equal the reward function applied to the stored genotype, every candidate a function fails
on is stored ``failed`` with the right reason and the loop's penalty, a bad spec creates nothing, and a killed
search resumes to exactly its budget of distinct evaluations, the same ones an uninterrupted run evaluates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import sigkill_once_stored

import evaluator_plugins
import known_rewards
from nasfcos.cli import main
from nasfcos.errors import UserError
from nasfcos.search.config import SearchRunConfig, load_search_run_config
from nasfcos.search.evaluator import Evaluator, evaluator_kind, load_evaluator
from nasfcos.search.loop import run_search
from nasfcos.search.store import ResultStore
from nasfcos.space.genotype import Genotype

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRESET = ROOT / "configs" / "search-cpu.yaml"
#: Small and cheap: no TensorBoard, no progress bar.
QUIET = ["--set", "search.tensorboard=false", "--quiet"]


def rows(run_dir: Path) -> list[Any]:
    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        return store.all()


def genotype_of(row: Any) -> Genotype:
    return Genotype.from_json(row.genotype_json)


def search_cli(*args: str) -> int:
    return main(["search", "--config", str(PRESET), *QUIET, *args])


# ------------------------------------------------------------------------------------------ the calling rule


def full(genotype: Any, cache: Any, cfg: Any, *, seed: int, early_stop_reference: Any = None) -> float:
    return float(seed)


def full_with_defaults(genotype: Any, cache: Any = None, cfg: Any = None, *, seed: int = 0,
                       early_stop_reference: Any = None) -> float:
    return 1.0


def anything(*args: Any, **kwargs: Any) -> float:
    return float(len(args))


def genotype_and_options(genotype: Any, **options: Any) -> float:
    return 2.0


def test_which_call_a_function_gets() -> None:
    assert evaluator_kind(full) == evaluator_kind(full_with_defaults) == evaluator_kind(anything) == "full"
    assert evaluator_kind(known_rewards.dcn_concat_share) == "genotype"
    assert evaluator_kind(genotype_and_options) == "genotype"
    assert evaluator_kind(lambda g: 0.0) == "genotype"
    assert evaluator_kind(float) == "genotype"  # a builtin: no readable signature is required
    from nasfcos.search.proxy import evaluate_candidate

    assert evaluator_kind(evaluate_candidate) == "full"  # the proxy task keeps its internal call


def test_load_evaluator_scores_one_genotype_like_the_search() -> None:
    from nasfcos.space import PRESETS

    genotype = PRESETS["nas-fcos"].genotype
    score = load_evaluator("evaluator_plugins:with_metrics", [str(HERE)])
    assert isinstance(score, Evaluator) and score.kind == "genotype" and score.python_path == (str(HERE),)
    result = score(genotype)
    expected = evaluator_plugins.shares(genotype)
    assert result.status == "ok" and result.reward == pytest.approx(known_rewards.dcn_concat_share(genotype))
    assert result.reward == pytest.approx(0.5 * expected["dcn_share"] + 0.5 * expected["concat_share"])
    assert result.metrics == pytest.approx(expected) and result.params == 1234  # "note" is not a number
    broken = load_evaluator("evaluator_plugins:troublesome")
    assert broken.function is evaluator_plugins.troublesome
    import random

    from nasfcos.search.config import SpaceConfig, build_search_space

    space, rng, found = build_search_space(SpaceConfig()), random.Random(0), {}
    for _ in range(2000):  # a genotype for each way the function fails (about one draw in ten each)
        sample = space.sample(rng)
        found.setdefault(evaluator_plugins.failure_kind(sample.key()), sample)
    reasons = {"raises": "ValueError: objective broke on", "nan": "non-finite", "string": "returned str",
               "no_reward": "returned no reward", "bool": "returned bool"}
    assert set(found) == {None, *reasons}
    for kind, reason in reasons.items():
        result = broken(found[kind])
        assert result.status == "failed" and reason in result.error and result.reward is None, (kind, result)
    assert broken(found[None]).status == "ok"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("evaluator_plugins:no_such_function", "module 'evaluator_plugins' has no attribute 'no_such_function'"),
    ("evaluator_plugins:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not callable"),
    ("evaluator_plugins", "expected 'module:function'"),
    ("broken_plugin:score", "importing module 'broken_plugin' failed (ZeroDivisionError"),
])
def test_a_bad_spec_is_one_line_exit_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           spec: str, message: str) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "broken_plugin.py").write_text("def score(g):\n    return 1.0\n\n1 / 0\n")
    out = tmp_path / "run"
    code = search_cli("--evaluator", spec, "--python-path", str(HERE), "--python-path", str(tmp_path / "plugins"),
                      "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(UserError, match="not a folder"):
        load_evaluator("evaluator_plugins:with_metrics", [str(tmp_path / "missing")])
    assert search_cli("--evaluator", "evaluator_plugins:with_metrics", "--python-path", str(tmp_path / "missing"),
                      "--out", str(out)) == 2
    assert "--python-path" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------ command line


def test_cli_evaluator_needs_no_cache_stores_metrics_and_resumes_with_it(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    plugins = tmp_path / "plugins"  # a folder of the user's own: only --python-path makes it importable
    plugins.mkdir()
    (plugins / "my_objective_mod.py").write_text(
        "import known_rewards\n\n"
        "def score(genotype):\n"
        "    return {'reward': known_rewards.dcn_concat_share(genotype), 'cells': len(genotype.fpn)}\n")
    code = search_cli("--evaluator", "my_objective_mod:score", "--python-path", str(plugins), "--strategy", "random",
                      "--budget", "12", "--executor", "inline", "--seed", "1", "--out", str(run_dir))
    out = capsys.readouterr().out
    assert code == 0 and "evaluated 12 architectures (0 failed" in out
    stored = rows(run_dir)
    assert len({r.key for r in stored}) == 12
    for row in stored:
        assert row.status == "ok" and row.reward == pytest.approx(known_rewards.dcn_concat_share(genotype_of(row)))
        assert row.metrics == {"cells": 7.0}
    saved = load_search_run_config(base=run_dir / "config.yaml")
    assert saved.evaluator == "my_objective_mod:score" and saved.python_path == (str(plugins),)
    assert saved.cache is None
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sum("candidate/metrics/cells" in entry for entry in log) == 12
    topk = json.loads((run_dir / "topk" / "topk.json").read_text())
    assert topk[0]["metrics"] == {"cells": 7.0} and topk[0]["reward"] == max(r.reward for r in stored)

    # --resume re-uses the recorded evaluator and python path; a larger budget evaluates only the new ones.
    assert main(["search", "--resume", str(run_dir), "--budget", "16", "--quiet"]) == 0
    assert len(rows(run_dir)) == 16 and [r.key for r in rows(run_dir)][:12] == [r.key for r in stored]
    # Another evaluator on resume: one line, exit 2, the run untouched.
    before = (run_dir / "config.yaml").read_text()
    assert main(["search", "--resume", str(run_dir), "--evaluator", "known_rewards:dcn_concat_share",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "evaluator differs from the run being resumed" in err and err.count("\n") == 1
    assert (run_dir / "config.yaml").read_text() == before and len(rows(run_dir)) == 16
    # The proxy task still needs a cache.
    assert search_cli("--budget", "3", "--out", str(tmp_path / "x")) == 2
    assert "--cache: required" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_a_failing_evaluator_is_a_failed_candidate_like_any_other(tmp_path: Path, executor: str) -> None:
    run_dir = tmp_path / "run"
    code = search_cli("--evaluator", "evaluator_plugins:troublesome", "--python-path", str(HERE), "--strategy",
                      "random", "--budget", "24", "--executor", executor, "--workers", "2", "--batch-size", "6",
                      "--seed", "2", "--set", "search.failure_margin=0.25", "--out", str(run_dir))
    assert code == 0
    stored = rows(run_dir)
    assert len({r.key for r in stored}) == 24
    kinds = {evaluator_plugins.failure_kind(r.key) for r in stored}
    assert None in kinds and len(kinds - {None}) >= 3  # good answers and several kinds of failure
    reasons = {"raises": "ValueError: objective broke on", "nan": "non-finite", "string": "returned str",
               "no_reward": "returned no reward", "bool": "returned bool"}
    for row in stored:
        kind = evaluator_plugins.failure_kind(row.key)
        if kind is None:
            assert row.status == "ok" and row.reward == pytest.approx(
                known_rewards.dcn_concat_share(genotype_of(row)))
            assert set(row.metrics) == {"dcn_share", "concat_share"} and row.params == 1234
            continue
        assert row.status == "failed" and reasons[kind] in row.error, (kind, row.error)
        # The loop's penalty: the worst reward of the earlier batches minus the margin (the preset's -10 first).
        earlier = [r.reward for r in stored if r.status == "ok" and r.controller_step < row.controller_step]
        assert row.reward == pytest.approx(min(earlier) - 0.25 if earlier else -10.0)


# ------------------------------------------------------------------------------------------ Python API


def test_python_api_takes_a_spec_or_a_function(tmp_path: Path) -> None:
    cfg = load_search_run_config(PRESET, None, ["search.budget=8", "search.strategy=random", "search.executor=inline",
                                                "search.tensorboard=false"])
    summary = run_search(tmp_path / "spec", cfg, evaluator="evaluator_plugins:with_metrics", python_path=[str(HERE)],
                         progress=False)
    assert summary.evaluated == 8 and all(set(r.metrics) == {"dcn_share", "concat_share"}
                                          for r in rows(tmp_path / "spec"))
    assert load_search_run_config(base=tmp_path / "spec" / "config.yaml").evaluator == "evaluator_plugins:with_metrics"
    # A plain function (even a lambda, in process) works too; the same seed gives the same genotypes.
    run_search(tmp_path / "fn", cfg, evaluator=lambda g: known_rewards.dcn_concat_share(g), progress=False)
    assert [r.key for r in rows(tmp_path / "fn")] == [r.key for r in rows(tmp_path / "spec")]
    assert [r.reward for r in rows(tmp_path / "fn")] == [r.reward for r in rows(tmp_path / "spec")]
    # The spec in the config is used when no evaluator is passed; a different one passed is refused.
    from dataclasses import replace

    with_spec = replace(cfg, evaluator="known_rewards:dcn_concat_share")
    assert run_search(tmp_path / "cfg", with_spec, progress=False).evaluated == 8
    with pytest.raises(UserError, match="give one of them"):
        run_search(tmp_path / "both", with_spec, evaluator="evaluator_plugins:with_metrics", progress=False)
    assert not (tmp_path / "both").exists()
    with pytest.raises(UserError, match="cache: required"):
        run_search(tmp_path / "proxy", SearchRunConfig(), progress=False)


# ------------------------------------------------------------------------------------------ kill -9 + resume


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_of_a_process_executor_search_then_resume(tmp_path: Path) -> None:
    """A real ``nasfcos search --evaluator ... --executor process`` is SIGKILLed after some results are stored;
    ``--resume`` ends with exactly the budget of distinct evaluations, the same set an uninterrupted run has.
    The evaluator's folder is on no PYTHONPATH: only ``--python-path`` (recorded in config.yaml, re-used by the
    resumed process and handed to every worker) makes it importable."""
    budget, run_dir = 40, tmp_path / "run"
    before, after = tmp_path / "calls-before.txt", tmp_path / "calls-after.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nasfcos.cli", "search", *QUIET]
    first = [*command, "--config", str(PRESET), "--evaluator", "evaluator_plugins:slow_dcn_concat_share",
             "--python-path", str(HERE), "--executor", "process", "--workers", "2", "--budget", str(budget),
             "--seed", "3", "--out", str(run_dir)]
    proc = subprocess.Popen(first, env={**env, evaluator_plugins.SLEEP_ENV: "0.25",
                                        evaluator_plugins.CALLS_FILE_ENV: str(before)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    sigkill_once_stored(proc, run_dir / "store.sqlite", 12)
    at_kill = [r.key for r in rows(run_dir)]
    assert 12 <= len(at_kill) < budget

    resumed = subprocess.run([*command, "--resume", str(run_dir)], env={**env, evaluator_plugins.CALLS_FILE_ENV:
                                                                           str(after)},
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"evaluated {budget} architectures (0 failed" in resumed.stdout
    final = rows(run_dir)
    assert len(final) == len({r.key for r in final}) == budget
    new = _lines(after)
    assert len(new) == len(set(new)) and not set(new) & set(at_kill)  # nothing evaluated twice
    assert set(at_kill) | set(new) == {r.key for r in final}
    for row in final:
        assert row.reward == pytest.approx(known_rewards.dcn_concat_share(genotype_of(row)))

    # The uninterrupted run (same seed and settings, in process, inline): the same genotypes in the same
    # batches (a process pool stores a batch in completion order) and the same final search state.
    reference = tmp_path / "reference"
    cfg = load_search_run_config(PRESET, None, [f"search.budget={budget}", "search.seed=3", "search.executor=inline",
                                                "search.tensorboard=false"])
    run_search(reference, cfg, evaluator="known_rewards:dcn_concat_share", progress=False)
    assert sorted((r.controller_step, r.key) for r in final) == sorted((r.controller_step, r.key)
                                                                       for r in rows(reference))
    with ResultStore(run_dir / "store.sqlite", readonly=True) as a, \
            ResultStore(reference / "store.sqlite", readonly=True) as b:
        assert a.get_meta("loop_state") == b.get_meta("loop_state")


@pytest.mark.slow
def test_ray_executor_runs_a_user_evaluator_from_its_python_path(tmp_path: Path) -> None:
    """Ray workers import the evaluator from ``--python-path`` (it is on no PYTHONPATH); a failing candidate
    is a failed candidate there too. A local Ray instance: tens of seconds, so slow."""
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "nasfcos.cli", "search", *QUIET, "--config", str(PRESET), "--evaluator",
         "evaluator_plugins:troublesome", "--python-path", str(HERE), "--executor", "ray", "--workers", "2",
         "--strategy", "random", "--budget", "12", "--batch-size", "6", "--seed", "2", "--out", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = rows(run_dir)
    assert len({r.key for r in stored}) == 12
    for row in stored:
        expected_ok = evaluator_plugins.failure_kind(row.key) is None
        assert (row.status == "ok") == expected_ok, (row.status, row.error)
        if expected_ok:
            assert row.reward == pytest.approx(known_rewards.dcn_concat_share(genotype_of(row)))
