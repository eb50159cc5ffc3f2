"""Distributed helpers (two real Gloo processes on the CPU) and the rank-0-only run logger / progress bar."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nasfcos.errors import UserError
from nasfcos.train import distributed as D
from nasfcos.logs import ProgressBar, RunLogger, format_eta, format_scalars, read_log


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: join the group through the torchrun variables, run every helper, write what it saw."""
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    info = D.init_distributed(device="cpu", timeout_s=60)
    try:
        x = torch.tensor([rank + 1.0, 2.0 * rank])
        total = D.all_reduce_sum(x)
        mean = D.all_reduce_mean(torch.tensor([rank + 1, 10]))  # ints are averaged as floats
        losses = D.reduce_dict({"a": torch.tensor(float(rank)), "b": torch.tensor(4.0 * rank)})
        gathered = D.all_gather_object({"rank": rank})
        broadcast = D.broadcast_object(f"from {rank}", src=1)
        seed = D.seed_everything(7, rank)
        draw = torch.rand(1).item()
        with RunLogger(Path(out_dir) / "run", use_tensorboard=False) as logger:
            logger.log(5, {"loss": losses["a"], "rank": rank})
        D.barrier()
        result = {
            "info": [info.rank, info.world_size, info.local_rank, info.is_distributed, str(info.device)],
            "input_after": x.tolist(), "sum": total.tolist(), "mean": mean.tolist(),
            "losses": {k: v.item() for k, v in losses.items()}, "gathered": gathered, "broadcast": broadcast,
            "main": D.is_main_process(), "rank": D.get_rank(), "world": D.get_world_size(),
            "seed": seed, "draw": draw,
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        D.cleanup_distributed()


def test_two_cpu_processes_all_reduce(tmp_path):
    world_size = 2
    # fork starts in well under a second (spawn re-imports torch in each child: many seconds on a busy CPU);
    # each worker sets one intra-op thread first, as DataLoader workers do, so forking after OpenMP use is safe.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size,
                                 join=False, start_method=method)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size))
    assert r0["info"] == [0, 2, 0, True, "cpu"] and r1["info"] == [1, 2, 1, True, "cpu"]
    for r, res in enumerate((r0, r1)):
        assert res["sum"] == [3.0, 2.0]  # (1 + 2), (0 + 2)
        assert res["mean"] == [1.5, 10.0]
        assert res["losses"] == {"a": 0.5, "b": 2.0}
        assert res["input_after"] == [r + 1.0, 2.0 * r]  # reductions do not modify their input
        assert res["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert res["broadcast"] == "from 1"
        assert (res["rank"], res["world"], res["main"]) == (r, 2, r == 0)
    assert (r0["seed"], r1["seed"]) == (7, 8) and r0["draw"] != r1["draw"]
    records = read_log(tmp_path / "run" / "log.jsonl")
    # Rank 0's line only; its loss is the reduced "a" = mean(0, 1).
    assert [(rec["step"], rec["rank"], rec["loss"]) for rec in records] == [(5, 0.0, 0.5)]


def test_single_process_fallbacks(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed(device="cpu")
    assert info == D.DistInfo(0, 1, 0, False, torch.device("cpu")) and info.is_main
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(x), x) and D.all_reduce_sum(x) is not x
    assert torch.equal(D.all_reduce_mean(x), x)
    assert D.all_gather_object(3) == [3] and D.broadcast_object("a") == "a"
    assert D.is_main_process() and D.get_world_size() == 1
    D.barrier()
    assert D.reduce_dict({}) == {}


def test_environment_and_device_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        D.init_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match=r"WORLD_SIZE must be an integer \(got 'two'\)"):
        D.init_distributed(device="cpu")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        D.resolve_device("tpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            D.resolve_device("cuda:0")
        assert D.resolve_device("auto") == torch.device("cpu")


def test_seed_everything_reproduces_draws():
    import random

    import numpy as np

    D.seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    D.seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    D.seed_everything(3, rank=1)
    assert torch.rand(1).item() != first[2]


# --------------------------------------------------------------------------------------------------------------
# Run logger and progress bar (rank 0 writes; the two-process test above checks the other rank stays silent)
# --------------------------------------------------------------------------------------------------------------


def test_run_logger_writes_complete_flushed_json_lines(tmp_path):
    logger = RunLogger(tmp_path, use_tensorboard=False)
    logger.log(1, {"loss": torch.tensor(1.5), "lr": 0.01})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()  # readable before close: flushed per line
    assert len(lines) == 1
    logger.log(2, {"loss": float("nan"), "big": float("inf")}, prefix="train")
    logger.log_event("eval", step=2, metrics={"AP": 0.3}, checkpoint=tmp_path / "c.pth")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["loss"] == 1.5 and records[0]["lr"] == 0.01
    assert isinstance(records[0]["time"], float) and abs(records[0]["time"] - time.time()) < 3600
    assert records[1]["train/loss"] == "NaN" and records[1]["train/big"] == "Infinity"
    assert math.isnan(float(records[1]["train/loss"]))
    assert records[2]["event"] == "eval" and records[2]["metrics"] == {"AP": 0.3}
    assert records[2]["checkpoint"] == str(tmp_path / "c.pth")

    with RunLogger(tmp_path, use_tensorboard=False) as again:  # appends, never truncates
        again.log(3, {"loss": 1.0})
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # a run killed mid-line
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 2, 3]


def test_run_logger_disabled_writes_nothing(tmp_path):
    with RunLogger(tmp_path / "run", enabled=False) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log_event("x")
    assert not (tmp_path / "run").exists()


def test_tensorboard_events_and_missing_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path / "a") as logger:
        assert logger.tensorboard
        logger.log(1, {"loss": 1.0})
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        logger = RunLogger(tmp_path / "b")
    assert not logger.tensorboard
    logger.log(1, {"loss": 2.0})
    logger.close()
    assert read_log(tmp_path / "b" / "log.jsonl")[0]["loss"] == 2.0


def test_progress_plain_lines_when_not_a_tty():
    stream = io.StringIO()  # not a TTY
    bar = ProgressBar(total=10, initial=0, desc="train", stream=stream, enabled=True, text_every=2)
    for step in range(1, 11):
        bar.update(step, {"loss": 1.23456, "cls": 0.5, "lr": 0.01})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("train 10/10 | loss 1.235 cls 0.5 lr 1.00e-02 | ")
    assert " it/s | ETA " in lines[0]


def test_progress_tqdm_and_disabled(monkeypatch):
    stream = io.StringIO()
    with ProgressBar(total=5, initial=1, stream=stream, enabled=True, use_tqdm=True) as bar:
        bar.update(3, {"loss": 0.5})
    assert "3/5" in stream.getvalue() and "loss 0.5" in stream.getvalue()
    quiet = io.StringIO()
    with ProgressBar(total=5, stream=quiet, enabled=False) as bar:
        bar.update(5, {"loss": 0.5})
        bar.write("hello")
    assert quiet.getvalue() == ""

    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("CI", "true")
    ci = FakeTTY()
    with ProgressBar(total=4, stream=ci, enabled=True, text_every=4) as bar:
        for step in range(1, 5):
            bar.update(step)
    assert ci.getvalue().startswith("train 4/4 | ")  # plain text under CI even on a terminal


def test_formatting_helpers():
    assert format_eta(3725) == "1:02:05" and format_eta(float("nan")) == "?"
    assert format_scalars({"loss": 0.123456, "lr": 0.0025, "tiny": 1e-5}) == "loss 0.1235 lr 2.50e-03 tiny 1.00e-05"
