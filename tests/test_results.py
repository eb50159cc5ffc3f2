"""The one evaluation record: normalising evaluators' answers, what is logged, and the torch-free modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nasfcos.search.results import STATUSES, EvaluationResult, as_result

SRC = Path(__file__).resolve().parents[1] / "src"


def test_as_result_makes_plain_numbers_and_fails_what_cannot_be_a_result() -> None:
    got = as_result({"reward": np.float32(-1.5), "params": np.int64(12), "gmacs": "0.25", "epochs_run": 3.0,
                     "history": [{"epoch": 1}], "unknown": 1}, wall_time_s=2.0)
    assert got == EvaluationResult(status="ok", reward=-1.5, params=12, gmacs=0.25, epochs_run=3,
                                   metrics={"unknown": 1.0})
    assert type(got.reward) is float and type(got.params) is int and got.wall_time_s == 2.0
    assert got.history == ({"epoch": 1},)
    assert as_result(got) == got and as_result(got, wall_time_s=9.0).wall_time_s == got.wall_time_s
    # An ok/pruned result needs a finite reward; a failed one keeps its error and may have none.
    assert as_result({"status": "pruned", "reward": float("inf")}).error.startswith("evaluator returned a non-finite")
    assert as_result({"status": "failed", "reward": None, "error": "OOM"}) == EvaluationResult.failure("OOM")
    assert "status 'weird'" in as_result({"status": "weird", "reward": 1.0}).error
    assert as_result(3.0) == EvaluationResult(reward=3.0)  # a bare number is the reward
    for unusable in ("0.5", None, True, [1.0], np.ones(2)):
        assert as_result(unusable).status == "failed", unusable
    with pytest.raises(ValueError, match="status"):
        EvaluationResult(status="done", reward=1.0)


def test_logged_scalars_and_equality_ignore_timing() -> None:
    result = EvaluationResult(reward=-3.0, loss_cls=1.0, loss_reg=1.5, loss_ctr=0.5, params=7, wall_time_s=4.0,
                              epochs_run=2, early_stop_loss=3.5, seed=1)
    assert result.scalars() == {"loss_cls": 1.0, "loss_reg": 1.5, "loss_ctr": 0.5, "params": 7.0,
                                "wall_time_s": 4.0}
    assert result.loss_sum == 3.0 and EvaluationResult(reward=1.0).loss_sum is None
    assert result == EvaluationResult(**{**result.evaluation_fields(), "wall_time_s": 99.0, "history": ({},)})
    assert STATUSES == ("ok", "failed", "pruned")


def test_results_config_store_and_runner_import_without_torch() -> None:
    code = ("import sys\n"
            "import nasfcos.search.config, nasfcos.search.results, nasfcos.search.store, nasfcos.search.runner\n"
            "import nasfcos.search.early_stop, nasfcos.search.run_folder, nasfcos.search.loop\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
