"""The demo pipeline end to end at a seconds-long scale: every stage runs, resumes, and the report appears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nasfcos.demo import STAGES, format_table, format_verdict, run_demo
from nasfcos.errors import UserError


def test_demo_runs_every_stage_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    messages: list[str] = []
    summary = run_demo(out, seed=0, scale="smoke", threads=1, say=messages.append)
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    names = [m["name"] for m in summary["models"]]
    assert names == ["searched-1", "fpn-fcos"]
    for model in summary["models"]:
        assert 0.0 <= model["AP"] <= 1.0
        assert model["params_m"] > 0 and model["gmacs"] > 0 and model["latency_ms"] > 0
    assert "| searched-1 | searched |" in format_table(summary)
    report = (out / "report.md").read_text()
    assert "fpn-fcos" in report
    # The baseline carries its own proxy reward: the fpn-fcos decoder through the search's proxy task.
    baseline = summary["models"][-1]
    assert baseline["kind"] == "baseline" and baseline["search_reward"] < 0
    assert stages["search"]["baseline_reward"] == baseline["search_reward"]
    assert "best reward" in messages[[m.startswith("[4/") for m in messages].index(True) + 1]
    # fpn-fcos trained again with seed 1: the seed noise the best searched AP is judged against.
    noise_runs = stages["train"]["baseline_seeds"]
    assert [r["seed"] for r in noise_runs] == [0, 1]
    assert noise_runs[0]["AP"] == baseline["AP"]
    assert (out / noise_runs[1]["run"] / "model_final.pt").is_file()
    verdict = summary["verdict"]
    assert verdict["model"] == "searched-1" and verdict["AP"] == summary["models"][0]["AP"]
    assert summary["baseline_noise"]["aps"] == [r["AP"] for r in noise_runs]
    assert verdict["outcome"] in {"better", "worse", "within-noise", "no-spread"}
    assert verdict["sentence"] in format_verdict(summary) and verdict["sentence"] in report
    assert "Searched vs baseline, with the seed noise" in report
    assert any(verdict["sentence"] in m for m in messages)

    again: list[str] = []
    run_demo(out, seed=0, scale="smoke", threads=1, say=again.append)
    assert all("skipping" in line for line in again if line.startswith("["))


def test_demo_refuses_a_folder_made_with_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stages.json").write_text(json.dumps({"settings": {"seed": 99}, "stages": {}}))
    with pytest.raises(UserError, match="other settings"):
        run_demo(out, seed=0, scale="smoke", threads=1, say=lambda _: None)
    with pytest.raises(UserError, match="--scale"):
        run_demo(tmp_path / "x", scale="huge")
