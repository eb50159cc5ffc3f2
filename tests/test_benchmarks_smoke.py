"""Benchmark scripts: each CPU script's ``main()`` runs with tiny settings and writes a well-formed JSON + markdown.

No timing is asserted (timings live in benchmarks/results). What is checked: the files exist, the JSON has the
documented keys, every measured number is finite and positive, derived numbers follow from the measured ones
(ratios, extrapolations, the FLOP convention), the machine/load record is there, and the GPU script skips
cleanly without CUDA. The helpers' statistics are checked against hand-computed values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import load_benchmark as _load

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_record(record: dict[str, Any], out: Path, name: str, threads: int) -> dict[str, Any]:
    """The files exist, the JSON on disk equals what main() returned (as JSON), and the common keys are there."""
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    assert json_path.is_file() and md_path.is_file()
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["benchmark"] == name
    for key in ("settings", "machine", "load", "notes"):
        assert key in data
    machine = data["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "torchvision", "torch_threads", "date"):
        assert machine[key] not in (None, "")
    assert machine["torch_threads"] == threads
    assert machine["torch"] == torch.__version__
    assert len(data["load"]["before"]) == 3 and len(data["load"]["after"]) == 3
    assert isinstance(data["load"]["loaded"], bool)
    markdown = md_path.read_text(encoding="utf-8")
    assert "Machine: " in markdown and machine["cpu_model"] in markdown
    return data


def test_common_statistics_hand_computed() -> None:
    common = _load("_common")
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]
    assert common.percentile(values, 90) == 9.0  # nearest rank: ceil(0.9 * 10) = 9th smallest
    assert common.percentile(values, 50) == 5.0
    assert common.percentile([7.0], 90) == 7.0
    stats = common.summarize(values)
    assert stats == {"median": 5.5, "p90": 9.0, "min": 1.0, "max": 10.0, "n": 10}
    calls: list[int] = []
    times = common.time_calls(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    table = common.markdown_table(["a", "b"], [[1, 0.5], [None, 123.4]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| - | 123 |"]


def test_inference_latency_quick(tmp_path: Path) -> None:
    module = _load("inference_latency")
    record = module.main(["--size", "64", "--repeats", "2", "--warmup", "0", "--threads", "1", "--skip-gmacs",
                          "--models", "torchvision-fcos,nas-fcos@128", "--out-dir", str(tmp_path)])
    data = _check_record(record, tmp_path, "inference_latency", threads=1)
    rows = data["results"]
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in ("torchvision-fcos", "nas-fcos@128") for v in ("default", "full-nms")}
    for row in rows:
        for key in ("median_ms", "p90_ms", "min_ms", "ratio_to_torchvision"):
            assert _positive(row[key]), (key, row)
        assert row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["repeats"] == 2
        assert isinstance(row["boxes"], int) and 0 <= row["boxes"] <= 100
    by = {(r["model"], r["variant"]): r for r in rows}
    for variant in ("default", "full-nms"):
        ours, ref = by[("nas-fcos@128", variant)], by[("torchvision-fcos", variant)]
        assert ref["ratio_to_torchvision"] == 1.0
        assert ours["ratio_to_torchvision"] == pytest.approx(ours["median_ms"] / ref["median_ms"])
    # score_thresh 0 lets every candidate through: both libraries fill their 100 detections.
    assert by[("torchvision-fcos", "full-nms")]["boxes"] == 100
    assert by[("nas-fcos@128", "full-nms")]["boxes"] == 100
    assert by[("torchvision-fcos", "default")]["score_thresh"] == pytest.approx(0.2)
    assert by[("nas-fcos@128", "default")]["score_thresh"] == pytest.approx(0.05)


def test_cached_vs_recomputed_quick(tmp_path: Path) -> None:
    module = _load("cached_vs_recomputed")
    record = module.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    data = _check_record(record, tmp_path, "cached_vs_recomputed", threads=1)
    (row,) = data["results"]
    assert row["backbone"] == "resnet18"
    for path in ("cached", "recomputed"):
        for part in ("step", "data", "decoder"):
            assert _positive(row[f"{path}_{part}_s"]), (path, part)
        assert math.isfinite(row[f"{path}_final_loss"])
        per_image = row[f"{path}_step_s"] / data["settings"]["batch"]
        assert row[f"{path}_epoch_s"] == pytest.approx(per_image * 4000)
        assert row[f"{path}_candidate_h"] == pytest.approx(per_image * 4000 * 15 / 3600)
    assert row["speedup"] == pytest.approx(row["recomputed_step_s"] / row["cached_step_s"])
    d = row["decoder_pooled_s"]
    assert min(row["cached_decoder_s"], row["recomputed_decoder_s"]) <= d <= max(row["cached_decoder_s"],
                                                                                  row["recomputed_decoder_s"])
    assert row["speedup_pooled"] == pytest.approx((row["recomputed_data_s"] + d) / (row["cached_data_s"] + d))
    # ResNet-18 at 64 px: C2 64 x 16 x 16, C3 128 x 8 x 8, C4 256 x 4 x 4, C5 512 x 2 x 2, float16 = 2 bytes.
    assert row["feature_shapes"] == {"c2": [64, 16, 16], "c3": [128, 8, 8], "c4": [256, 4, 4], "c5": [512, 2, 2]}
    assert row["cache_mb_per_image"] == pytest.approx(2 * (64 * 256 + 128 * 64 + 256 * 16 + 512 * 4) / 1e6)


def test_proxy_throughput_quick(tmp_path: Path) -> None:
    module = _load("proxy_throughput")
    record = module.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    data = _check_record(record, tmp_path, "proxy_throughput", threads=1)
    assert data["settings"]["proxy"]["epochs"] == 2 and data["settings"]["proxy"]["width"] == 8
    modes = {m["mode"]: m for m in data["modes"]}
    assert set(modes) == {"full", "one-epoch", "early-stop-kept", "early-stop-pruned"}
    for mode in modes.values():
        assert _positive(mode["candidate_s"]) and _positive(mode["candidates_per_hour"])
        assert mode["candidates_per_hour"] == pytest.approx(3600 / mode["candidate_s"])
        assert _positive(mode["train_images_per_s_end_to_end"])
    # The forced references do what they say: every candidate pruned after epoch 1, or none.
    assert modes["early-stop-pruned"]["pruned"] == modes["early-stop-pruned"]["candidates"]
    assert modes["early-stop-pruned"]["epochs_run"] == 1
    assert modes["early-stop-kept"]["pruned"] == 0 and modes["early-stop-kept"]["epochs_run"] == 2
    assert modes["full"]["epochs_run"] == 2 and modes["one-epoch"]["epochs_run"] == 1
    for peak in data["peak"].values():
        assert _positive(peak["gflops"]) and _positive(peak["median_s"]) and peak["min_s"] <= peak["median_s"]
        assert peak["gflops"] == pytest.approx(peak["gflop"] / peak["min_s"])
        assert peak["gflops_median"] == pytest.approx(peak["gflop"] / peak["median_s"])
    assert data["peak"]["matmul"]["gflop"] == pytest.approx(2 * 256**3 / 1e9)
    for genotype in data["per_genotype"]:
        assert _positive(genotype["gmacs_per_image"])
        if genotype["train_images_per_s"] is not None:  # None only if noise made the marginal epoch <= 0
            assert genotype["achieved_gflops"] == pytest.approx(
                genotype["gmacs_per_image"] * 3 * 2 * genotype["train_images_per_s"])
    summary = data["summary"]
    if summary["achieved_gflops"] is not None:
        assert summary["fraction_of_matmul_peak"] == pytest.approx(
            summary["achieved_gflops"] / data["peak"]["matmul"]["gflops"])


def test_gpu_paper_settings_skips_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load("gpu_paper_settings")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = module.main(["--threads", "1", "--out-dir", str(tmp_path)])
    data = _check_record(record, tmp_path, "gpu_paper_settings", threads=1)
    assert data["skipped"] is True and data["reason"] == "no CUDA device"
    assert "latency" not in data and "proxy" not in data
    assert "skipped: no CUDA device" in (tmp_path / "gpu_paper_settings.md").read_text(encoding="utf-8")


def test_cpu_preset_ap_quick_then_reused(tmp_path: Path) -> None:
    module = _load("cpu_preset_ap")
    argv = ["--quick", "--threads", "1", "--archs", "fpn-fcos", "--seeds", "0,1", "--data", str(tmp_path / "synth"),
            "--runs", str(tmp_path / "runs"), "--out-dir", str(tmp_path)]
    record = module.main(argv)
    data = _check_record(record, tmp_path, "cpu_preset_ap", threads=1)
    assert sorted(data["runs"]) == ["fpn-fcos/seed0", "fpn-fcos/seed1"]
    for seed in (0, 1):
        run = data["runs"][f"fpn-fcos/seed{seed}"]
        assert run["arch"] == "fpn-fcos" and run["seed"] == seed and run["reused"] is False
        assert run["iterations"] == 3
        for key in ("AP", "AP50", "AP75"):
            assert 0.0 <= run[key] <= 1.0 or run[key] == -1.0  # pycocotools: -1 where a size range has no GT
        assert _positive(run["seconds_per_step"])
        metrics = json.loads((tmp_path / "runs" / "fpn-fcos" / f"seed{seed}" / "metrics.json").read_text("utf-8"))
        assert run["AP"] == pytest.approx(metrics["AP"])
        config = (tmp_path / "runs" / "fpn-fcos" / f"seed{seed}" / "config.yaml").read_text("utf-8")
        assert f"seed: {seed}" in config
    (row,) = data["summary"]
    aps = [data["runs"][f"fpn-fcos/seed{s}"]["AP"] for s in (0, 1)]
    assert row["seeds"] == [0, 1] and row["AP"]["values"] == pytest.approx(aps)
    assert row["AP"]["mean"] == pytest.approx(sum(aps) / 2)
    assert row["AP"]["std"] == pytest.approx(abs(aps[0] - aps[1]) / 2 ** 0.5)  # sample std of two values
    again = module.main(argv)  # a finished run is reused, not retrained, and keeps its measurement date
    assert again["runs"]["fpn-fcos/seed0"]["reused"] is True
    assert again["runs"]["fpn-fcos/seed0"]["measured"] == data["runs"]["fpn-fcos/seed0"]["measured"]
    # A run measured earlier whose folder is gone (another machine) is kept from the JSON, not retrained.
    import shutil

    shutil.rmtree(tmp_path / "runs" / "fpn-fcos" / "seed1")
    kept = module.main(argv)
    assert kept["runs"]["fpn-fcos/seed1"]["AP"] == pytest.approx(aps[1])
    assert not (tmp_path / "runs" / "fpn-fcos" / "seed1").exists()
    assert "| fpn-fcos | 2 |" in (tmp_path / "cpu_preset_ap.md").read_text(encoding="utf-8")


def test_seconds_per_step_from_log(tmp_path: Path) -> None:
    module = _load("_common")  # cpu_preset_ap's s / step column and proxy_fidelity's cost estimate
    log = tmp_path / "log.jsonl"
    rows = [{"step": 10, "time": 100.0, "train/loss": 1.0}, {"step": 20, "time": 120.0, "train/loss": 1.0},
            {"step": 20, "time": 121.0, "val/AP": 0.1},  # an evaluation row: not a training interval
            {"step": 30, "time": 150.0, "train/loss": 1.0}, {"step": 40, "time": 190.0, "train/loss": 1.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    assert module.seconds_per_step(log) == pytest.approx(3.0)  # median of 2.0, 3.0, 4.0 s/step
    assert module.seconds_per_step(tmp_path / "missing.jsonl") is None


def test_executor_faults_quick(tmp_path: Path) -> None:
    """The fault-injection comparison runs; the supervised pool loses nothing and charges no bystander."""
    import json

    module = _load("executor_faults")
    assert module.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "executor_faults.json").read_text())
    supervised = next(row for row in record["designs"] if row["design"] == "supervised")
    assert supervised["finished"] and supervised["correct"] and supervised["results"] == 6
    assert supervised["bystander_extra_runs"] == 0 and supervised["errors"] == 0
    assert supervised["culprit_runs"] == 2 * len(module._culprits(6))  # each culprit: one death, one success
