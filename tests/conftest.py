"""Shared fixtures: a tiny synthetic data set and one tiny trained detector, made once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``):
    tiny LSTM steps and tiny feature maps are fastest single-threaded and immune to a busy machine's
    oversubscription. The previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def restore_torch_threads() -> Iterator[None]:
    """Give the rest of the session its torch thread count back after a test whose code calls
    ``torch.set_num_threads`` (the benchmark scripts do)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 + 8 image synthetic set at 96 px (seconds to make)."""
    from nasfcos.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, seed=0, num_train=16, num_val=8, image_size=96)
    return root


def tiny_train_overrides(data: Path, iters: int = 4) -> list[str]:
    """Config overrides for a seconds-long CPU training run on :func:`tiny_synth`."""
    return [
        "model.arch=fpn-fcos",
        "model.backbone=resnet18",
        "model.fpn_width=16",
        "model.head_width=16",
        "model.freeze_at=0",
        "model.frozen_bn=false",
        "data.format=synthetic",
        f"data.train_path={data}",
        "data.min_size=96",
        "data.test_min_size=96",
        "data.max_size=96",
        "solver.batch_size=4",
        "solver.base_lr=0.005",
        "solver.warmup_iters=2",
        f"solver.max_iter={iters}",
        f"solver.steps=[{iters * 10}]",
        "solver.grad_clip_norm=35",
        "runtime.num_workers=0",
        "runtime.checkpoint_period=2",
        "runtime.log_period=1",
        "runtime.tensorboard=false",
        "runtime.threads=1",
    ]


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with model_final.pt trained for 4 iterations on :func:`tiny_synth`."""
    from nasfcos.config import TrainConfig, load_config
    from nasfcos.train.trainer import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(TrainConfig, None, tiny_train_overrides(tiny_synth))
    train(cfg, run_dir, quiet=True)
    return run_dir
