"""The search loop with cheap deterministic fake evaluators: budget, de-duplication, determinism, failures,
outputs, config files and the command line.

The fake evaluators here are also used by ``test_executors.py`` and ``test_search_resume.py`` (by import and as
``"test_search_loop:<name>"`` specs that worker processes resolve).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nasfcos.errors import UserError
from nasfcos.search.config import (
    ProxyConfig,
    SearchConfig,
    SearchRunConfig,
    SpaceConfig,
    load_search_run_config,
)
from nasfcos.search.loop import run_search
from nasfcos.search.store import ResultStore

# ---------------------------------------------------------------------------------------------------- fakes

#: In-process record of evaluator calls (keys), for the inline executor.
CALLS: list[str] = []
#: Environment variables the fakes read (they also work in worker processes and subprocesses).
CALLS_FILE_ENV = "NASFCOS_TEST_CALLS_FILE"
SLEEP_ENV = "NASFCOS_TEST_EVAL_SLEEP"

#: 12 genotypes: plain FPN fixed, head of two layers over two ops, three share indices.
TINY_SPACE = SpaceConfig(fixed_fpn="fpn-fcos", num_head_layers=2, head_ops=("conv3x3", "skip"))
#: 108 genotypes: three head layers over three ops, four share indices.
SMALL_SPACE = SpaceConfig(fixed_fpn="fpn-fcos", num_head_layers=3, head_ops=("conv3x3", "skip", "dcn3x3"))


def genotype_ops(genotype: Any) -> list[str]:
    ops = []
    if isinstance(genotype.fpn, tuple):
        for cell in genotype.fpn:
            ops += [cell.op1, cell.op2]
    head = genotype.head
    ops += list(getattr(head, "ops", ()))
    return ops


def fake_reward(genotype: Any) -> float:
    """A pure function of the genotype: number of dcn3x3 ops minus a key-derived jitter in [0, 0.5)."""
    jitter = int(hashlib.sha1(genotype.key().encode()).hexdigest()[:6], 16) % 500 / 1000
    return genotype_ops(genotype).count("dcn3x3") - jitter


def _record_call(key: str) -> None:
    CALLS.append(key)
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(key + "\n")


def deterministic_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                            early_stop_reference: Any = None) -> dict[str, Any]:
    """Reward from :func:`fake_reward`; sleeps ``$NASFCOS_TEST_EVAL_SLEEP`` seconds first (kill tests)."""
    delay = float(os.environ.get(SLEEP_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    _record_call(genotype.key())
    reward = fake_reward(genotype)
    return {"status": "ok", "reward": reward, "loss_cls": -reward / 2, "loss_reg": -reward / 4,
            "loss_ctr": -reward / 4, "gmacs": 1.5, "params": 1000 + len(genotype_ops(genotype)),
            "seed": seed}


def is_bad(key: str) -> bool:
    return int(key[:8], 16) % 4 == 0


def flaky_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                    early_stop_reference: Any = None) -> dict[str, Any]:
    """Raises for a quarter of the genotypes, reports a proxy-style failure for another quarter."""
    key = genotype.key()
    _record_call(key)
    if is_bad(key):
        raise RuntimeError(f"boom {key[:8]}")
    if int(key[:8], 16) % 4 == 1:
        return {"status": "failed", "reward": None, "error": "FloatingPointError: non-finite training loss"}
    return {"status": "ok", "reward": fake_reward(genotype)}


def quick_cfg(**changes: Any) -> SearchConfig:
    """Small and fast: tiny PPO (one epoch), no TensorBoard."""
    base: dict[str, Any] = {"budget": 8, "batch_size": 3, "seed": 0, "tensorboard": False, "space": SMALL_SPACE}
    base.update(changes)
    cfg = SearchConfig(**base)
    from dataclasses import replace

    return replace(cfg, ppo=replace(cfg.ppo, epochs=1, buffer_size=16))


def run_cfg(cache: Path, search: SearchConfig, proxy: ProxyConfig | None = None) -> SearchRunConfig:
    """The run config of ``search`` on ``cache`` (the default proxy settings unless given)."""
    return SearchRunConfig(cache=str(cache), search=search, proxy=proxy if proxy is not None else ProxyConfig())


def cache_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir(exist_ok=True)
    return folder


def keys_in_order(run_dir: Path) -> list[str]:
    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        return [r.key for r in store.all()]


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


# ---------------------------------------------------------------------------------------------------- budget


def test_reaches_exact_budget_of_distinct_evaluations_despite_repeats(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="random", budget=30, batch_size=6, space=SMALL_SPACE)
    summary = run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator,
                         progress=False)
    keys = keys_in_order(tmp_path / "run")
    assert summary.evaluated == len(keys) == 30
    assert len(set(keys)) == 30
    # Every distinct genotype trained exactly once; re-proposals reused the stored reward.
    assert sorted(CALLS) == sorted(keys)
    assert summary.repeats > 0 and summary.proposals >= 30 + summary.repeats
    assert summary.stop_reason == "budget"
    with ResultStore(tmp_path / "run" / "store.sqlite", readonly=True) as store:
        for row in store.all():
            from nasfcos.space.genotype import Genotype

            assert row.reward == pytest.approx(fake_reward(Genotype.from_json(row.genotype_json)))
            assert row.status == "ok" and row.controller_step is not None


def test_store_is_idempotent_by_key(tmp_path: Path) -> None:
    run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), quick_cfg(strategy="random", budget=5)),
               evaluator=deterministic_evaluator, progress=False)
    with ResultStore(tmp_path / "run" / "store.sqlite") as store:
        first = store.all()[0]
        from dataclasses import replace

        assert store.add(replace(first, reward=123.0, id=None)) is False
        assert store.count() == 5 and store.get(first.key).reward == first.reward


def test_stops_when_the_strategy_only_proposes_known_genotypes(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="random", budget=20, batch_size=4, space=TINY_SPACE, max_proposals_factor=3)
    summary = run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator,
                         progress=False)
    assert summary.stop_reason == "proposal_limit"
    assert summary.proposals == 60
    assert summary.evaluated == len(set(CALLS)) == len(CALLS) <= 12


def test_last_batch_is_truncated_to_the_budget(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="random", budget=7, batch_size=5)
    summary = run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator,
                         progress=False)
    assert summary.evaluated == 7 and len(CALLS) == 7
    assert summary.updates == 2


# ---------------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_genotype_sequence(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="ppo", budget=9, batch_size=3)
    for name in "ab":
        run_search(tmp_path / name, run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator,
                   progress=False)
    from dataclasses import replace

    run_search(tmp_path / "c", run_cfg(cache_dir(tmp_path), replace(cfg, seed=1)), evaluator=deterministic_evaluator,
               progress=False)
    a, b, c = (keys_in_order(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c
    with ResultStore(tmp_path / "a" / "store.sqlite", readonly=True) as sa, \
            ResultStore(tmp_path / "b" / "store.sqlite", readonly=True) as sb:
        assert sa.state_blob() == sb.state_blob()  # identical controller, optimiser, baseline, RNG


def test_candidate_seed_depends_on_search_seed_and_genotype_only() -> None:
    from nasfcos.search.loop import candidate_seed

    assert candidate_seed(0, "ab") == candidate_seed(0, "ab")
    assert len({candidate_seed(0, "ab"), candidate_seed(1, "ab"), candidate_seed(0, "ac")}) == 3
    assert 0 <= candidate_seed(7, "ff") < 2**31


# ---------------------------------------------------------------------------------------------------- failures


def test_failed_candidates_are_recorded_with_error_and_penalty(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="random", budget=16, batch_size=4, failure_margin=0.5, initial_failure_reward=-7.0)
    summary = run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg), evaluator=flaky_evaluator,
                         progress=False)
    assert summary.evaluated == 16
    with ResultStore(tmp_path / "run" / "store.sqlite", readonly=True) as store:
        rows = store.all()
    failed = [r for r in rows if r.status == "failed"]
    assert failed and len(failed) < len(rows)
    for row in failed:
        if is_bad(row.key):
            assert row.error.startswith("RuntimeError: boom " + row.key[:8])
        else:
            assert "non-finite training loss" in row.error
        earlier = [r.reward for r in rows if r.controller_step < row.controller_step and r.status == "ok"]
        expected = min(earlier) - 0.5 if earlier else -7.0
        assert row.reward == pytest.approx(expected)
    # The top-k only lists successful candidates.
    assert all(r.status == "ok" for r in summary.top)


def test_fixed_failure_reward_wins(tmp_path: Path) -> None:
    cfg = quick_cfg(strategy="random", budget=8, batch_size=4, failure_reward=-3.25)
    run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg), evaluator=flaky_evaluator, progress=False)
    with ResultStore(tmp_path / "run" / "store.sqlite", readonly=True) as store:
        failed = store.all(status="failed")
    assert failed and all(r.reward == -3.25 for r in failed)


def test_lambda_evaluator_needs_the_inline_executor(tmp_path: Path) -> None:
    cfg = quick_cfg(executor="process", workers=2)
    with pytest.raises(UserError, match="importable module-level function"):
        run_search(tmp_path / "run", run_cfg(cache_dir(tmp_path), cfg),
                   evaluator=lambda g, c, p, *, seed, early_stop_reference=None: {"reward": 1.0}, progress=False)


# ---------------------------------------------------------------------------------------------------- outputs


def test_topk_files_logs_and_tensorboard(tmp_path: Path) -> None:
    from nasfcos.space.genotype import Genotype
    from nasfcos.logs import read_log

    cfg = quick_cfg(strategy="ppo", budget=6, batch_size=3, top_k=4, tensorboard=True)
    run_dir = tmp_path / "run"
    summary = run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator,
                         progress=False)
    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        best = store.top_k(4)
        all_rewards = sorted((r.reward for r in store.all()), reverse=True)
    assert [r.reward for r in best] == all_rewards[:4]
    files = sorted((run_dir / "topk").glob("rank*.json"))
    assert [f.name for f in files] == ["rank01.json", "rank02.json", "rank03.json", "rank04.json"]
    assert [Genotype.from_json(f.read_text()).key() for f in files] == [r.key for r in best]
    table = json.loads((run_dir / "topk" / "topk.json").read_text())
    assert [e["reward"] for e in table] == [r.reward for r in best]
    assert table[0]["gmacs"] == 1.5 and table[0]["loss_sum"] == pytest.approx(-best[0].reward)
    assert list(summary.topk_files) == files

    records = read_log(run_dir / "log.jsonl")
    rewards = [r["candidate/reward"] for r in records if "candidate/reward" in r]
    assert len(rewards) == 6
    best_so_far = [r["candidate/best_reward"] for r in records if "candidate/best_reward" in r]
    assert best_so_far == [max(rewards[: i + 1]) for i in range(6)]
    updates = [r for r in records if "update/baseline" in r]
    assert len(updates) == 2 and all("update/entropy" in r for r in updates)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_config_yaml_is_written_and_checked_on_resume(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = quick_cfg(strategy="random", budget=4, batch_size=2)
    proxy = ProxyConfig(width=16, epochs=2)
    run_dir = tmp_path / "run"
    run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, proxy), evaluator=deterministic_evaluator, progress=False)
    saved = load_search_run_config(base=run_dir / "config.yaml")
    assert saved.search == cfg and saved.proxy == proxy and saved.cache == os.path.abspath(cache_dir(tmp_path))

    with pytest.raises(UserError, match="already holds a search"):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, proxy), evaluator=deterministic_evaluator, progress=False)
    with pytest.raises(UserError, match=r"search\.seed differs"):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), replace(cfg, seed=5), proxy), resume=True,
                   evaluator=deterministic_evaluator, progress=False)
    with pytest.raises(UserError, match=r"proxy\.epochs differs"):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, replace(proxy, epochs=3)), resume=True,
                   evaluator=deterministic_evaluator, progress=False)
    with pytest.raises(UserError, match="not a search run folder"):
        run_search(tmp_path / "nothing", run_cfg(cache_dir(tmp_path), cfg, proxy), resume=True,
                   evaluator=deterministic_evaluator, progress=False)
    # A larger budget continues the search (and is written back).
    summary = run_search(run_dir, run_cfg(cache_dir(tmp_path), replace(cfg, budget=6), proxy), resume=True,
                         evaluator=deterministic_evaluator, progress=False)
    assert summary.evaluated == 6 and len(CALLS) == 6
    assert load_search_run_config(base=run_dir / "config.yaml").search.budget == 6


def test_run_search_takes_the_run_config_whole(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"cfg: SearchRunConfig"):
        run_search(tmp_path / "run", quick_cfg())  # a SearchConfig alone is not the run
    with pytest.raises(UserError, match="cache: required"):  # the proxy task needs one (an evaluator of your own not)
        run_search(tmp_path / "run", SearchRunConfig(search=quick_cfg()))
    assert not (tmp_path / "run").exists()


def test_missing_cache_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="feature cache not found"):
        run_search(tmp_path / "run", run_cfg(tmp_path / "nope", quick_cfg()), evaluator=deterministic_evaluator,
                   progress=False)


# ---------------------------------------------------------------------------------------------------- configs


def test_shipped_search_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    cpu = load_search_run_config(root / "search-cpu.yaml")
    paper = load_search_run_config(root / "search-paper.yaml")
    assert 16 <= cpu.search.budget <= 100 and cpu.proxy.device == "cpu"
    assert paper.search.budget == 2800 and paper.search.executor == "ray" and paper.search.top_k == 20
    assert (paper.proxy.width, paper.proxy.epochs, paper.proxy.batch_size) == (64, 15, 200)
    assert paper.proxy.lr == pytest.approx(8e-4) and paper.proxy.polyak_decay == pytest.approx(0.9)
    assert (paper.search.ppo.lr, paper.search.ppo.clip, paper.search.ppo.grad_clip) == (1e-4, 0.1, 2.0)
    assert paper.search.controller.hidden_size == 100 and paper.search.controller.num_layers == 2
    from nasfcos.config import load_config

    assert paper.proxy == load_config(ProxyConfig, root / "proxy-paper.yaml")  # the same proxy task


def test_config_layers_and_errors(tmp_path: Path) -> None:
    proxy_file = tmp_path / "proxy.yaml"
    proxy_file.write_text("epochs: 4\nwidth: 32\n")
    cfg = load_search_run_config(None, proxy_file, ["search.budget=50", "proxy.width=8", "search.ppo.lr=0.001"])
    assert (cfg.search.budget, cfg.proxy.epochs, cfg.proxy.width, cfg.search.ppo.lr) == (50, 4, 8, 0.001)
    with pytest.raises(UserError, match="search.budgt"):
        load_search_run_config(None, None, ["search.budgt=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  strategy: evolution\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*search\.strategy"):
        load_search_run_config(bad)
    with pytest.raises(UserError, match="batch_size"):
        load_search_run_config(None, None, ["search.batch_size=0"])


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_search_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nasfcos.cli import main

    run_dir = tmp_path / "run"
    common = ["--set", "search.tensorboard=false", "--set", "search.ppo.epochs=1",
              "--set", "search.space.fixed_fpn=fpn-fcos", "--set", "search.space.num_head_layers=3", "--quiet"]
    code = main(["search", "--cache", str(cache_dir(tmp_path)), "--evaluator", "test_search_loop:deterministic_evaluator",
                 "--budget", "4", "--batch-size", "2",
                 "--strategy", "random", "--seed", "3", "--out", str(run_dir), *common])
    out = capsys.readouterr().out
    assert code == 0
    assert "evaluated 4 architectures" in out and f"run folder: {run_dir}" in out and "rank" in out
    assert len(keys_in_order(run_dir)) == 4
    # Resume with a larger budget: only the new ones are evaluated.
    assert main(["search", "--resume", str(run_dir), "--budget", "6", "--quiet"]) == 0
    assert len(keys_in_order(run_dir)) == 6 and len(CALLS) == 6
    # A changed seed is refused with a one-line message and exit status 2.
    assert main(["search", "--resume", str(run_dir), "--seed", "4", "--quiet"]) == 2
    assert "search.seed differs" in capsys.readouterr().err
    assert main(["search", "--budget", "3", "--quiet", "--out", str(tmp_path / "x")]) == 2
    assert "--cache: required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- real proxy


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-image synthetic feature cache (ResNet-18, 64 px crops): seconds to build."""
    from nasfcos.data.cache import build_cache
    from nasfcos.data.synthetic import make_synthetic, read_synthetic

    root = tmp_path_factory.mktemp("search-cache")
    info = make_synthetic(root / "synth", seed=0, num_train=12, num_val=4, image_size=64)
    build_cache(read_synthetic(info, "train"), root / "cache", backbone="resnet18", crop=64, meta_train=8, seed=0,
                batch_size=8, device="cpu", threads=1, progress=False)
    return root / "cache"


def _tiny_proxy() -> Any:
    return ProxyConfig(width=8, epochs=2, batch_size=4, max_train_batches=1, device="cpu", threads=1,
                       early_stop_epoch=1)


def test_search_with_the_real_proxy(tmp_path: Path, small_cache: Path) -> None:
    from nasfcos.search.early_stop import EarlyStopReference

    cfg = quick_cfg(budget=3, batch_size=3, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2))
    proxy = _tiny_proxy()
    run_dir = tmp_path / "run"
    summary = run_search(run_dir, run_cfg(small_cache, cfg, proxy), progress=False)  # default evaluator: the proxy
    assert summary.evaluated == 3 and summary.failed == 0
    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        rows = store.all()
        losses = [r.early_stop_loss for r in rows]
        assert not [k for k in store.meta_keys() if k.startswith("early_stop_loss/")]  # a field, not meta
        fingerprint = store.get_meta("cache_fingerprint")
        state = json.loads(store.get_meta("loop_state"))
    for row in rows:
        assert row.status == "ok" and row.reward == pytest.approx(-row.loss_sum, rel=1e-6)
        assert row.gmacs > 0 and row.params > 0 and row.wall_time_s > 0
    from nasfcos.data.cache import FeatureCache

    assert fingerprint == FeatureCache.open(small_cache).fingerprint
    expected = EarlyStopReference.for_config(proxy)
    for loss in losses:
        expected.update(loss)
    assert state["early_stop_reference"] == expected.to_dict() and expected.count == 3
    saved = load_search_run_config(base=run_dir / "config.yaml")
    assert saved.proxy == proxy and saved.search == cfg


def test_resume_refuses_a_different_cache(tmp_path: Path, small_cache: Path) -> None:
    import shutil

    cfg = quick_cfg(budget=1, batch_size=1, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2))
    run_search(tmp_path / "run", run_cfg(small_cache, cfg, _tiny_proxy()), progress=False)
    other = tmp_path / "other-cache"
    shutil.copytree(small_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["key"]["seed"] = 12345  # a cache built differently
    (other / "manifest.json").write_text(json.dumps(manifest))
    from dataclasses import replace

    with pytest.raises(UserError, match="differs from the one this search started with"):
        run_search(tmp_path / "run", run_cfg(other, replace(cfg, budget=2), _tiny_proxy()), resume=True, progress=False)
    # The same cache under another path is fine (the cache path may change on resume).
    moved = tmp_path / "moved-cache"
    shutil.copytree(small_cache, moved)
    summary = run_search(tmp_path / "run", run_cfg(moved, replace(cfg, budget=2), _tiny_proxy()), resume=True,
                         progress=False)
    assert summary.evaluated == 2


@pytest.mark.slow
def test_real_proxy_in_worker_processes_matches_inline(tmp_path: Path, small_cache: Path) -> None:
    from dataclasses import replace

    cfg = quick_cfg(budget=4, batch_size=2, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2))
    run_search(tmp_path / "inline", run_cfg(small_cache, cfg, _tiny_proxy()), progress=False)
    process_cfg = replace(cfg, executor="process", workers=2, worker_threads=1)
    run_search(tmp_path / "process", run_cfg(small_cache, process_cfg, _tiny_proxy()), progress=False)
    with ResultStore(tmp_path / "inline" / "store.sqlite", readonly=True) as a, \
            ResultStore(tmp_path / "process" / "store.sqlite", readonly=True) as b:
        rewards_a = {r.key: r.reward for r in a.all()}
        rewards_b = {r.key: r.reward for r in b.all()}
    assert rewards_a.keys() == rewards_b.keys()
    for key, reward in rewards_a.items():
        assert rewards_b[key] == pytest.approx(reward, rel=1e-4)
