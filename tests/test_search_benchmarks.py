"""The search benchmarks at toy size: ``ppo_settings.py --quick`` and ``search_ppo_vs_random.py`` with a fake
evaluator (budget 8, inline executor). Checked: the JSON/markdown exist and hold what the runs measured
(statistics recomputed here from the runs' own stores), and that a second invocation resumes instead of
re-evaluating."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

import test_search_loop
from test_search_loop import small_cache  # noqa: F401 (fixture)
from nasfcos.search.store import ResultStore

from helpers import load_benchmark as _load

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def test_quarter_means_and_spread_hand_computed() -> None:
    bench = _load("search_ppo_vs_random")
    assert bench.quarter_means([1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0, None]) == [1.5, 4.0, 5.5, 7.0]
    common = _load("_common")  # the spread over seeds the benchmarks share
    s = common.spread([1.0, 3.0, None])
    assert s == {"mean": 2.0, "std": statistics.stdev([1.0, 3.0]), "min": 1.0, "max": 3.0, "n": 2}
    assert common.spread([None])["mean"] is None and common.spread([2.0])["std"] is None


def test_ppo_settings_quick(tmp_path: Path) -> None:
    bench = _load("ppo_settings")
    record = bench.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "ppo_settings.json").read_text())
    assert data["benchmark"] == "ppo_settings" and data["settings"]["samples"] == 16
    for reward, rows in data["results"].items():
        assert set(rows) == {"random", "A-on-policy"}
        for name, summary in rows.items():
            assert 0.0 <= summary["last_fifth_mean"] <= summary["best_mean"] <= 1.0 + 1e-9
            assert summary["reached"] == sum(x is not None for x in summary["reach_samples"])
        assert rows["random"]["kl_last_fifth"] is None and rows["A-on-policy"]["kl_last_fifth"] > 0
    assert "### reward `dcn_concat_share`" in (tmp_path / "ppo_settings.md").read_text()
    assert record["results"] == data["results"]


def test_first_reach_counts_samples() -> None:
    bench = _load("ppo_settings")
    assert bench.first_reach([0.1, 0.96, 0.99], 0.95) == 2 and bench.first_reach([0.1], 0.95) is None


def test_search_ppo_vs_random_toy_runs_resume_and_merge(tmp_path: Path) -> None:
    bench = _load("search_ppo_vs_random")
    cache = test_search_loop.cache_dir(tmp_path)
    out, results = tmp_path / "runs", tmp_path / "results"
    common = ["--cache", str(cache), "--budget", "8", "--evaluator", "test_search_loop:deterministic_evaluator",
              "--python-path", str(Path(__file__).parent),
              "--set", "search.executor=inline", "--set", "search.tensorboard=false", "--set", "search.batch_size=4",
              "--out", str(out), "--out-dir", str(results)]
    test_search_loop.CALLS.clear()
    first = bench.main(common + ["--seeds", "0"])
    assert len(test_search_loop.CALLS) == 16  # 8 distinct evaluations per strategy
    record = bench.main(common + ["--seeds", "0,1"])
    assert len(test_search_loop.CALLS) == 32  # seed 0 re-read, seed 1 evaluated
    data = json.loads((results / "search_ppo_vs_random.json").read_text())
    for strategy in ("ppo", "random"):  # a re-read run keeps when it was measured
        seed0 = next(r for r in data["runs"].values() if r["strategy"] == strategy and r["seed"] == 0)
        assert seed0["measured"] == first["machine"]["date"] and "reread" in seed0
    assert len(data["runs"]) == 4 and record["summary"]["ppo"]["seeds"] == [0, 1]
    for run in data["runs"].values():
        folder = out / f"seed{run['seed']}" / bench.FOLDERS[run["strategy"]]
        with ResultStore(folder / "store.sqlite", readonly=True) as store:
            rewards = [r.reward for r in store.all()]
        assert len(rewards) == 8 == run["stats"]["evaluated"]
        assert run["stats"]["q1"] == pytest.approx(statistics.fmean(rewards[:2]))
        assert run["stats"]["q4"] == pytest.approx(statistics.fmean(rewards[6:]))
        assert run["stats"]["top5_mean"] == pytest.approx(statistics.fmean(sorted(rewards, reverse=True)[:5]))
        if run["strategy"] == "ppo":
            assert run["stats"]["updates"] == 2 and run["stats"]["kl_last"] > 0
    bests = [data["runs"][k]["stats"]["best"] for k in data["runs"] if k.endswith("/ppo/seed0") or k.endswith("/ppo/seed1")]
    assert data["summary"]["ppo"]["best"]["mean"] == pytest.approx(statistics.fmean(bests))
    text = (results / "search_ppo_vs_random.md").read_text()
    assert "Controller diagnostics" in text and "Machine: " in text and "| ppo | 0,1 |" in text


def test_verdict_words_follow_the_numbers() -> None:
    bench, spread = _load("search_ppo_vs_random"), _load("_common").spread
    ppo = {k: spread(v) for k, v in {"q1": [1.0, 1.2], "q4": [2.0, 2.2], "top5_mean": [3.0, 3.1],
                                          "best": [4.0, 4.1]}.items()}
    rnd = {k: spread(v) for k, v in {"q1": [1.0, 1.1], "q4": [1.0, 2.1], "top5_mean": [3.5, 3.6],
                                          "best": [3.9, 4.3]}.items()}
    lines = bench.verdict({"ppo": ppo, "random": rnd})
    assert lines[0].startswith("PPO last-quarter mean reward above random") and "ranges overlap" in lines[0]
    assert lines[1].startswith("PPO top-5 mean not above random") and "every PPO seed below" in lines[1]
    assert "ranges overlap" in lines[2]
    assert lines[3] == "rise from Q1 to Q4: PPO +1.000, random +0.500"


def test_proxy_reward_noise_statistics_hand_computed() -> None:
    module = _load("proxy_reward_noise")
    # a: 1, 3 and b: 5, 7 -> grand mean 4, between-group mean square 2 x (4 + 4) / 1 = 16, within 4 / 2 = 2
    assert module.intra_class_correlation({"a": [1.0, 3.0], "b": [5.0, 7.0]}) == pytest.approx(14 / 18)
    assert math.isnan(module.intra_class_correlation({"a": [1.0, 1.0], "b": [1.0, 1.0]}))  # no variance at all
    assert module.intra_class_correlation({"a": [0.0, 2.0], "b": [0.0, 2.0]}) == pytest.approx(-1.0)  # seed only
    same_order = {"x": {0: -1.0, 1: -1.1}, "y": {0: -2.0, 1: -2.2}, "z": {0: -3.0, 1: -3.1}}
    summary = module.summarise(same_order)
    assert summary["seed_pair_kendall_tau"] == [pytest.approx(1.0)]
    # seed stds 0.1 / sqrt 2, 0.2 / sqrt 2, 0.1 / sqrt 2 -> pooled sqrt((0.005 + 0.02 + 0.005) / 3) = 0.1
    assert summary["pooled_seed_std"] == pytest.approx(0.1)
    reversed_order = {"x": {0: -1.0, 1: -3.0}, "y": {0: -2.0, 1: -2.0}, "z": {0: -3.0, 1: -1.0}}
    assert module.summarise(reversed_order)["seed_pair_kendall_tau"] == [pytest.approx(-1.0)]


def test_proxy_reward_noise_quick_on_a_real_cache(tmp_path: Path, small_cache: Path) -> None:
    module = _load("proxy_reward_noise")
    record = module.main(["--quick", "--cache", str(small_cache), "--out-dir", str(tmp_path)])
    assert not record["failures"]
    assert set(record["rewards"]) == {"fpn-fcos", "nas-fcos", "random-01"}
    assert all(len(by_seed) == 2 for by_seed in record["rewards"].values())
    assert (tmp_path / "proxy_reward_noise.md").is_file()
