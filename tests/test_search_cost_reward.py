"""The cost-aware reward wired into the search loop (issue 13 item 4): off by default; when on, every stored
reward is the hand-computed cost-aware value of the evaluator's raw reward, the target measured from
``target_arch`` is the decoder cost counted independently, a resumed run keeps the target it started with, and
mistakes are one-line errors before a run folder exists."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nasfcos.errors import UserError
from nasfcos.search.config import CostRewardConfig, SearchRunConfig, SpaceConfig
from nasfcos.search.cost_reward import TARGET_META_KEY, cost_aware_reward
from nasfcos.search.loop import run_search
from nasfcos.search.proxy import decoder_cost
from nasfcos.search.store import ResultStore
from nasfcos.space.presets import PRESETS
from test_search_loop import _tiny_proxy, fake_reward, genotype_ops, quick_cfg, run_cfg, small_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def costly_evaluator(genotype: Any) -> dict[str, float]:
    """A pluggable evaluator with a known cost: the fake reward, and one GMAC per dcn3x3 op plus one."""
    return {"reward": fake_reward(genotype), "gmacs": 1.0 + genotype_ops(genotype).count("dcn3x3")}


def _rows(run_dir: Path) -> list[Any]:
    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        return store.all()


def _with_cost(cfg: Any, **cost: Any) -> Any:
    return replace(cfg, cost_reward=CostRewardConfig(enabled=True, **cost))


def test_off_by_default_the_reward_is_the_evaluators(tmp_path: Path) -> None:
    cfg = quick_cfg(budget=6, batch_size=3)
    assert cfg.cost_reward == CostRewardConfig() and not cfg.cost_reward.enabled
    run_search(tmp_path / "run", SearchRunConfig(search=cfg, evaluator="test_search_cost_reward:costly_evaluator"),
               progress=False)
    for row in _rows(tmp_path / "run"):
        assert "raw_reward" not in row.metrics
        assert row.reward == pytest.approx(fake_reward(_genotype(row)))


def test_every_stored_reward_is_the_hand_computed_cost_aware_one(tmp_path: Path) -> None:
    cfg = _with_cost(quick_cfg(budget=8, batch_size=4), target=2.0, weight=0.5)
    run_search(tmp_path / "run", SearchRunConfig(search=cfg, evaluator="test_search_cost_reward:costly_evaluator"),
               progress=False)
    rows = _rows(tmp_path / "run")
    assert len(rows) == 8 and len({r.gmacs for r in rows}) > 1  # several costs, so the term matters
    for row in rows:
        raw = fake_reward(_genotype(row))
        gmacs = 1.0 + genotype_ops(_genotype(row)).count("dcn3x3")
        assert row.metrics["raw_reward"] == pytest.approx(raw)
        assert row.metrics["cost_factor"] == pytest.approx((gmacs / 2.0) ** 0.5)
        # fake rewards are positive (dcn counts) or negative (jitter only): both branches by hand
        expected = raw / (gmacs / 2.0) ** 0.5 if raw >= 0 else raw * (gmacs / 2.0) ** 0.5
        assert row.reward == pytest.approx(expected)
        assert row.reward == pytest.approx(cost_aware_reward(raw, gmacs, 2.0, 0.5))


def test_a_null_target_is_fpn_fcos_on_the_cache_and_a_resume_keeps_it(tmp_path: Path, small_cache: Path) -> None:
    proxy = _tiny_proxy()
    cfg = _with_cost(quick_cfg(budget=2, batch_size=2, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2)),
                     weight=0.2)
    run_dir = tmp_path / "run"
    run_search(run_dir, run_cfg(small_cache, cfg, proxy), progress=False)
    target = decoder_cost(PRESETS["fpn-fcos"].genotype, small_cache, proxy.width)[1]
    with ResultStore(run_dir / "store.sqlite") as store:
        assert store.get_meta(TARGET_META_KEY) == pytest.approx(target)
        store.set_meta(TARGET_META_KEY, target * 4)  # a resumed run must use the stored value, not re-measure
    for row in _rows(run_dir):
        raw = -row.loss_sum
        assert row.metrics["raw_reward"] == pytest.approx(raw, rel=1e-6)
        assert row.reward == pytest.approx(raw * (row.gmacs / target) ** 0.2, rel=1e-6)
    run_search(run_dir, run_cfg(small_cache, replace(cfg, budget=3), proxy), resume=True, progress=False)
    newest = max(_rows(run_dir), key=lambda r: r.controller_step)
    assert newest.metrics["cost_factor"] == pytest.approx((newest.gmacs / (target * 4)) ** 0.2)


def test_latency_is_measured_by_the_proxy_when_it_is_the_cost(tmp_path: Path, small_cache: Path) -> None:
    proxy = replace(_tiny_proxy(), latency_runs=3)
    cfg = _with_cost(quick_cfg(budget=2, batch_size=2, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2)),
                     metric="latency_ms", weight=0.1)
    run_search(tmp_path / "run", run_cfg(small_cache, cfg, proxy), progress=False)
    with ResultStore(tmp_path / "run" / "store.sqlite", readonly=True) as store:
        target = store.get_meta(TARGET_META_KEY)
        rows = store.all()
    assert target > 0
    for row in rows:
        latency = row.metrics["latency_ms"]
        assert latency > 0
        assert row.reward == pytest.approx(row.metrics["raw_reward"] * (latency / target) ** 0.1)


@pytest.mark.parametrize("cost, proxy_changes, evaluator, match", [
    ({"metric": "latency_ms"}, {}, None, "proxy.latency_runs"),
    ({}, {}, "test_search_cost_reward:costly_evaluator", "search.cost_reward.target"),
    ({"target_arch": "no-such-arch"}, {}, None, "search.cost_reward.target_arch=no-such-arch"),
])
def test_mistakes_are_user_errors_before_a_run_folder_exists(tmp_path: Path, small_cache: Path, cost: dict,
                                                             proxy_changes: dict, evaluator: str | None,
                                                             match: str) -> None:
    cfg = replace(run_cfg(small_cache, _with_cost(quick_cfg(budget=2), **cost), replace(_tiny_proxy(), **proxy_changes)),
                  evaluator=evaluator)
    with pytest.raises(UserError, match=match):
        run_search(tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run").exists()


def _genotype(row: Any) -> Any:
    from nasfcos.space.genotype import Genotype

    return Genotype.from_json(row.genotype_json)


def test_the_report_puts_the_best_decoder_next_to_fpn_fcos(tmp_path: Path, small_cache: Path) -> None:
    import shutil

    from nasfcos.analysis.report import write_report

    proxy = _tiny_proxy()
    cfg = _with_cost(quick_cfg(budget=2, batch_size=2, space=SpaceConfig(num_fpn_cells=3, num_head_layers=2)),
                     weight=0.05)
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    run_dir = tmp_path / "run"
    run_search(run_dir, run_cfg(cache, cfg, proxy), progress=False)
    text = write_report(run_dir, examples=0).read_text(encoding="utf-8")
    section = text.split("### Cost of the best decoder", 1)[1].split("\n### ", 1)[0]
    fpn = next(line for line in section.splitlines() if line.startswith("| fpn-fcos |"))
    best = next(line for line in section.splitlines() if line.startswith("| best searched |"))
    fpn_gmacs = decoder_cost(PRESETS["fpn-fcos"].genotype, cache, proxy.width)[1]
    cells = [c.strip() for c in fpn.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(fpn_gmacs, rel=1e-3) and cells[3] == "1.00" and cells[5] == "1.00"
    top = max(_rows(run_dir), key=lambda r: r.reward)
    assert float(best.strip("|").split("|")[2]) == pytest.approx(top.gmacs, rel=1e-3)  # the search's own count
    assert "The reward was cost-aware" in section and "measured when the search started" in section
    shutil.rmtree(cache)  # moved away: the report says so instead of failing
    section = write_report(run_dir, examples=0).read_text(encoding="utf-8").split("### Cost of the best decoder")[1]
    assert "feature cache is not here" in section.split("\n### ", 1)[0]
