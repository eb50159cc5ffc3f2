"""``nasfcos report``: the report of a fake search / demo run, its figures, and the numbers behind the plots."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nasfcos.analysis.plots import (
    best_so_far,
    moving_average,
    plot_ap_vs_gmacs,
    plot_example_detections,
    plot_reward_curve,
    plot_strategy_comparison,
    quarter_means,
)
from nasfcos.analysis.report import find_run, write_report
from nasfcos.errors import UserError
from nasfcos.search.store import CandidateRecord, ResultStore
from nasfcos.space.search_space import SearchSpace

PENALTY = -10.0


# ----------------------------------------------------------------------------------------------------------
# Fake runs
# ----------------------------------------------------------------------------------------------------------


def make_search_run(folder: Path, n: int = 30, seed: int = 0, trend: float = 0.02, log: bool = True) -> list:
    """A search run folder filled through the real ResultStore: rewards rise with ``trend`` per candidate."""
    space = SearchSpace()
    rng = random.Random(seed)
    results, seen = [], set()
    while len(results) < n:
        genotype = space.sample(rng)
        key = genotype.key()
        if key in seen:
            continue
        seen.add(key)
        i = len(results)
        common = dict(key=key, genotype_json=genotype.to_json(), actions=space.encode(genotype),
                      gmacs=1.0 + rng.random(), params=int(1e6 + rng.random() * 1e6), wall_time_s=2.0,
                      controller_step=i)
        if i % 10 == 7:
            results.append(CandidateRecord.failed(error="RuntimeError: NaN loss", penalty=PENALTY, **common))
            continue
        reward = -2.0 + trend * i + rng.uniform(-0.1, 0.1)
        status = "pruned" if i % 10 == 4 else "ok"
        results.append(CandidateRecord(reward=reward, loss_cls=-reward / 2, loss_reg=-reward / 3,
                                       loss_ctr=-reward / 6, status=status, **common))
    with ResultStore(folder / "store.sqlite") as store:
        for step in range(0, n, 5):
            store.commit_step(results[step:step + 5], state_blob=b"state", meta={"strategy": "ppo"})
        best = store.top_k(3)
    (folder / "topk").mkdir()
    for rank, result in enumerate(best, start=1):
        (folder / "topk" / f"rank{rank:02d}.json").write_text(result.genotype_json)
    (folder / "config.yaml").write_text("search:\n  strategy: ppo\n  budget: 40\n  seed: 0\n")
    if log:
        with open(folder / "log.jsonl", "w") as handle:
            for step in range(n):
                # The loop's format: one candidate/ line per candidate, one update/ line per controller update.
                handle.write(json.dumps({"step": step + 1, "time": 1.0 + step,
                                         "candidate/reward": results[step].reward}) + "\n")
                if step % 5 == 4:
                    handle.write(json.dumps({"step": step // 5 + 1, "time": 1.5 + step,
                                             "update/entropy": 5.0 - 0.1 * step,
                                             "update/baseline": -2.0 + 0.01 * step}) + "\n")
            handle.write('{"step": 99, "update/entropy": ')  # a torn last line from a killed run
    return results


MODELS = [
    {"name": "searched@64", "kind": "searched", "arch": "{}", "backbone": "resnet18", "fpn_width": 64,
     "head_width": 64, "AP": 0.123, "AP50": 0.25, "AP75": 0.1, "APs": -1.0, "APm": 0.08, "APl": 0.2,
     "params_m": 12.3, "gmacs": 8.1, "latency_ms": 35.0, "weights": "train/searched/model_final.pt",
     "search_reward": -1.45},
    {"name": "fpn-fcos@64", "kind": "baseline", "arch": "fpn-fcos", "backbone": "resnet18", "fpn_width": 64,
     "head_width": 64, "AP": 0.101, "AP50": 0.22, "AP75": 0.08, "APs": 0.01, "APm": 0.07, "APl": 0.18,
     "params_m": 11.9, "gmacs": 7.6, "latency_ms": None, "weights": "train/fpn/model_final.pt",
     "search_reward": None},
    {"name": "deformable-fpn-fcos@64", "kind": "baseline", "arch": "deformable-fpn-fcos", "backbone": "resnet18",
     "fpn_width": 64, "head_width": 64, "AP": 0.11, "AP50": 0.23, "AP75": 0.09, "APs": 0.01, "APm": 0.07,
     "APl": 0.19, "params_m": 12.0, "gmacs": 7.7, "latency_ms": 40.0, "weights": "train/dfpn/model_final.pt",
     "search_reward": None},
]


def make_demo_run(folder: Path, with_random: bool = True, with_search: bool = True) -> None:
    folder.mkdir(parents=True)
    if with_search:
        (folder / "search").mkdir()
        make_search_run(folder / "search")
    if with_random:
        (folder / "search-random").mkdir()
        make_search_run(folder / "search-random", seed=1, trend=0.0, log=False)
    summary = {"models": MODELS, "data": {"val_json": "data/val.json", "val_images": "data/images"},
               "device": "cpu (2 threads)", "timings": {"search": 61.5, "train": 3700.0, "eval": 12.0}}
    (folder / "summary.json").write_text(json.dumps(summary))


def assert_png(path: Path, min_size: tuple[int, int] = (400, 250)) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], (path, image.size)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.var() > 0, f"{path} is blank"


# ----------------------------------------------------------------------------------------------------------
# Numbers behind the plots (hand-computed)
# ----------------------------------------------------------------------------------------------------------


def test_moving_average_matches_hand_computation() -> None:
    values = [1.0, 3.0, 2.0, 6.0, 4.0]
    # window 3, trailing: [1], [1,3], [1,3,2], [3,2,6], [2,6,4]
    assert moving_average(values, 3) == pytest.approx([1.0, 2.0, 2.0, 11 / 3, 4.0])
    assert moving_average(values, 1) == pytest.approx(values)
    assert moving_average(values, 10) == pytest.approx([1.0, 2.0, 2.0, 3.0, 3.2])
    assert moving_average([], 3) == []
    with pytest.raises(ValueError):
        moving_average(values, 0)


def test_best_so_far_and_quarter_means() -> None:
    assert best_so_far([None, 2.0, 1.0, None, 5.0])[1:] == [2.0, 2.0, 2.0, 5.0]
    assert np.isnan(best_so_far([None, 1.0])[0])
    # 8 values: quarters of 2: mean(1, 2) and mean(7, 8)
    assert quarter_means([1, 2, 3, 4, 5, 6, 7, 8]) == (1.5, 7.5)
    assert quarter_means([4.0]) == (4.0, 4.0)
    assert quarter_means([]) is None


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def test_plot_functions_write_readable_pngs(tmp_path: Path) -> None:
    rewards = [-2 + 0.05 * i for i in range(20)] + [PENALTY]
    statuses = ["ok"] * 18 + ["pruned", "ok", "failed"]
    assert_png(plot_reward_curve(rewards, statuses, tmp_path / "reward.png", window=4))
    assert_png(plot_strategy_comparison({"PPO": rewards[:-1], "random": [-2.0] * 20}, tmp_path / "cmp.png"))
    assert_png(plot_ap_vs_gmacs(MODELS + [{"name": "no-ap", "kind": "baseline"}], tmp_path / "ap.png"))
    image = Image.new("RGB", (128, 96), (40, 90, 160))
    det = {"boxes": [[10, 10, 60, 50], [70, 20, 120, 90]], "labels": [0, 1], "scores": [0.9, 0.1],
           "gt_boxes": [[12, 12, 58, 52]]}
    assert_png(plot_example_detections([(image, det, "first"), (image, det)], tmp_path / "ex.png", ["a", "b"]),
               min_size=(300, 150))
    with Image.open(tmp_path / "ex.png") as drawn:  # the 0.9 box is drawn in class 0's colour (red)
        red = np.asarray(drawn.convert("RGB"), dtype=np.int16)
    assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 110)).sum() > 50
    with pytest.raises(ValueError):
        plot_reward_curve([1.0, 2.0], ["ok"], tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def test_demo_report_has_every_section_and_figure(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    make_demo_run(run)
    report = write_report(run, examples=2)
    assert report == run / "report.md"
    text = report.read_text()
    for heading in ("# nasfcos report", "### Timings", "## Models", "## Search", "### Controller",
                    "### Best architecture", "### Top 3 candidates", "## Accuracy against computation",
                    "## Example detections", "## PPO against random search"):
        assert heading in text, heading
    # Models table: AP fractions shown in percent, -1 as n/a, every model listed.
    assert "| **searched@64** | searched | resnet18 | 64/64 | 12.3 | 25.0 | 10.0 | n/a |" in text
    assert "| 12.30 | 8.1 | 35.0 | -1.4500 |" in text  # params, GMACs (4 significant digits), latency, reward
    assert all(m["name"] in text for m in MODELS)
    # Search facts: budget from config.yaml, status counts from the store (30 = 21 ok + 3 failed + 3 pruned...).
    assert "Budget: 40 candidates (75% done)" in text
    assert "30 distinct candidates: 24 ok, 3 failed, 3 pruned" in text
    assert "first quarter (6 candidates)" in text and "rising" in text
    assert "Timings" in text and "1 h 01 min" in text  # 3700 s
    # Weights are absent: examples skipped with a note, no crash.
    assert "_Skipped: no model weights found in this run folder._" in text
    for name in ("reward_curve", "controller", "best_genotype", "ap_vs_gmacs", "ppo_vs_random"):
        assert f"figures/{name}.png" in text
        assert_png(run / "figures" / f"{name}.png")
    assert (run / "figures" / "best_genotype.dot").read_text().startswith("digraph")
    assert not (run / "figures" / "examples.png").exists()


def test_quarter_means_in_report_are_the_store_rewards(tmp_path: Path) -> None:
    results = make_search_run(tmp_path)
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    counted = [r.reward for r in results if r.status != "failed"]
    first, last = quarter_means(counted)
    assert f"first quarter (6 candidates): {first:.4f}; last quarter (6 candidates): {last:.4f}" in text
    best = max(r.reward for r in results if r.status == "ok")
    assert f"Best reward: {best:.4f}" in text


def test_search_run_report_without_log_or_summary(tmp_path: Path) -> None:
    make_search_run(tmp_path, n=12, log=False)
    text = write_report(tmp_path).read_text()
    assert "## Search" in text and "## Models" not in text
    assert "_Skipped: no log.jsonl" in text
    assert "## PPO against random search" not in text  # no sibling
    assert_png(tmp_path / "figures" / "reward_curve.png")


def test_search_run_finds_random_sibling(tmp_path: Path) -> None:
    (tmp_path / "search").mkdir()
    (tmp_path / "search-random").mkdir()
    make_search_run(tmp_path / "search", n=12)
    make_search_run(tmp_path / "search-random", n=12, seed=3, trend=0.0)
    text = write_report(tmp_path / "search", examples=0).read_text()
    assert "## PPO against random search" in text
    assert_png(tmp_path / "search" / "figures" / "ppo_vs_random.png")


def test_empty_store_and_broken_summary_are_notes(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    (run / "search").mkdir(parents=True)
    ResultStore(run / "search" / "store.sqlite").close()
    (run / "summary.json").write_text("{not json")
    text = write_report(run).read_text()
    assert "summary.json could not be read" in text
    assert "the results store is empty" in text
    assert "no successful candidate yet" in text


def test_not_a_run_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a nasfcos run folder"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="run folder not found"):
        find_run(tmp_path / "missing")
    assert not (tmp_path / "report.md").exists()


def test_cli_prints_report_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nasfcos.cli import main

    make_search_run(tmp_path, n=8, log=False)
    assert main(["report", str(tmp_path), "--examples", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def _write_tiny_model_and_data(run: Path) -> None:
    """Untrained weights of a small real detector + two validation images in COCO format, as the demo writes."""
    import torch

    from nasfcos.detection.detector import build_detector
    from nasfcos.space.presets import PRESETS

    class_names = ["square", "disc"]
    meta = {"genotype": PRESETS["fpn-fcos"].genotype.to_json(), "arch": "fpn-fcos", "backbone": "resnet18",
            "num_classes": 2, "fpn_width": 16, "head_width": 16, "fcos": "vanilla", "concat": "grouped",
            "class_names": class_names, "category_ids": [1, 2], "min_size": [96], "test_min_size": 96,
            "max_size": 128, "size_divisible": 32}
    torch.manual_seed(0)
    model = build_detector("fpn-fcos", backbone="resnet18", num_classes=2, fpn_width=16, head_width=16,
                           min_size=96, max_size=128)
    weights = run / MODELS[0]["weights"]
    weights.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "meta": meta}, weights)
    images = run / "data" / "images"
    images.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]}
    for k in range(2):
        image = Image.new("RGB", (96, 80), (30, 30, 30))
        image.paste((200, 50, 50), (10 + 20 * k, 10, 50 + 20 * k, 50))
        image.save(images / f"val{k}.png")
        coco["images"].append({"id": k + 1, "file_name": f"val{k}.png", "width": 96, "height": 80})
        coco["annotations"].append({"id": k + 1, "image_id": k + 1, "category_id": 1,
                                    "bbox": [10 + 20 * k, 10, 40, 40], "area": 1600.0, "iscrowd": 0})
    (run / "data" / "val.json").write_text(json.dumps(coco))


def test_example_detections_from_real_weights(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    make_demo_run(run, with_random=False, with_search=False)
    _write_tiny_model_and_data(run)
    text = write_report(run, examples=1).read_text()
    assert "_Skipped: no search results in this run" in text
    assert "figures/examples.png" in text
    assert "Detections of **searched@64**" in text and "first 1 validation image:" in text
    assert_png(run / "figures" / "examples.png", min_size=(300, 150))
    assert "## PPO against random search" not in text


def test_controller_panel_reads_a_real_ppo_search_log(tmp_path: Path) -> None:
    """The loop's own log.jsonl (not a hand-written one) must feed the controller diagnostics figure."""
    from test_search_loop import cache_dir, deterministic_evaluator, quick_cfg, run_cfg

    from nasfcos.search.loop import run_search

    run = tmp_path / "run"
    run_search(run, run_cfg(cache_dir(tmp_path), quick_cfg(strategy="ppo", budget=9, batch_size=3)),
               evaluator=deterministic_evaluator, progress=False)
    write_report(run)
    text = (run / "report.md").read_text()
    assert "figures/controller.png" in text and "no two controller updates" not in text
    assert_png(run / "figures" / "controller.png")
