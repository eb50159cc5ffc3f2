"""Full training: outputs, exact resume, DDP on two CPU processes, and the train/eval/predict commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nasfcos.cli import main
from nasfcos.config import TrainConfig, load_config
from nasfcos.train.trainer import load_trained_model, train

from conftest import tiny_train_overrides

REPO = Path(__file__).resolve().parents[1]


def test_run_folder_has_weights_metrics_log_and_config(tiny_trained_run: Path) -> None:
    for name in ("model_final.pt", "metrics.json", "log.jsonl", "config.yaml", "detections_val.json"):
        assert (tiny_trained_run / name).is_file(), name
    metrics = json.loads((tiny_trained_run / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    lines = [json.loads(line) for line in (tiny_trained_run / "log.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "train/loss" in line]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (tiny_trained_run / "checkpoints").iterdir()) == [
        "checkpoint_0000002.pth",
        "checkpoint_0000004.pth",
    ]


def test_weights_reload_identically(tiny_trained_run: Path) -> None:
    model, meta = load_trained_model(tiny_trained_run / "model_final.pt")
    saved = torch.load(tiny_trained_run / "model_final.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert meta["num_classes"] == 6 and meta["backbone"] == "resnet18"


def test_resume_continues_exactly(tiny_synth: Path, tmp_path: Path) -> None:
    straight = train(load_config(TrainConfig, None, tiny_train_overrides(tiny_synth, iters=4)), tmp_path / "a", quiet=True)
    first = load_config(TrainConfig, None, [*tiny_train_overrides(tiny_synth, iters=4), "solver.max_iter=2"])
    train(first, tmp_path / "b", quiet=True)
    resumed = train(load_config(TrainConfig, None, tiny_train_overrides(tiny_synth, iters=4)), tmp_path / "b", resume=True, quiet=True)
    assert resumed.steps == 4
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_WORKER = """
import sys, torch
from nasfcos.config import TrainConfig, load_config
from nasfcos.train.trainer import train
sys.path.insert(0, {tests!r})
from conftest import tiny_train_overrides
cfg = load_config(TrainConfig, None, tiny_train_overrides({data!r}, iters=3) + ["solver.batch_size=4"])
result = train(cfg, {run!r}, quiet=True)
import os
torch.save(result.model.state_dict(), {run!r} + "/rank" + os.environ["RANK"] + ".pt")
"""


def test_ddp_two_cpu_processes_end_with_identical_weights(tiny_synth: Path, tmp_path: Path) -> None:
    run = str(tmp_path / "ddp")
    os.makedirs(run)
    script = DDP_WORKER.format(tests=str(REPO / "tests"), data=str(tiny_synth), run=run)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    rank0 = torch.load(f"{run}/rank0.pt", weights_only=True)
    rank1 = torch.load(f"{run}/rank1.pt", weights_only=True)
    # Parameters must match exactly; BatchNorm running statistics are per process (FCOS keeps FPN BN per GPU;
    # DDP re-broadcasts rank 0's buffers at the start of every forward, so they differ only after the last one).
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    parameters = [k for k in rank0 if not k.endswith(statistics)]
    trained = [k for k in parameters if "decoder" in k]
    assert trained
    for key in parameters:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = torch.load(f"{run}/model_final.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in trained)


def test_eval_command_writes_metrics(tiny_trained_run: Path, tiny_synth: Path, tmp_path: Path, capsys) -> None:
    code = main(["eval", "--checkpoint", str(tiny_trained_run / "model_final.pt"), "--data", str(tiny_synth),
                 "--out", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0
    assert "| AP | AP50" in capsys.readouterr().out


def test_predict_command_draws_and_writes_coco_results(tiny_trained_run: Path, tiny_synth: Path, tmp_path: Path) -> None:
    images = sorted((tiny_synth / "images" / "val").iterdir())[:2]
    code = main(["predict", "--checkpoint", str(tiny_trained_run / "model_final.pt"), *map(str, images),
                 "--out", str(tmp_path), "--min-score", "0.0"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in images)
    results = json.loads((tmp_path / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)


def test_user_mistakes_exit_2_with_one_line(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--set", "solver.lrr=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "solver.lrr" in err[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--data", str(tiny_synth)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt" in err[0]
    assert main(["predict", "--checkpoint", str(bad), str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
