"""Checkpoints: exact resume (weights, optimiser, scheduler, scaler, RNG draws), safety, rotation, DDP keys."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from nasfcos.errors import UserError
from nasfcos.train.checkpoint import (
    checkpoint_path,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from nasfcos.train.optim import build_optimizer
from nasfcos.train.schedule import WarmupMultiStepLR


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def make_training(seed: int):
    model = make_model(seed)
    opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = WarmupMultiStepLR(opt, steps=(3, 6), warmup_iters=2)
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(2, 3, 6, 6)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def draws() -> tuple:
    return (random.random(), float(np.random.rand()), np.random.normal(), torch.rand(3).tolist())


def test_save_perturb_load_restores_everything(tmp_path):
    model, opt, sched = make_training(0)
    train_steps(model, opt, sched, 4)
    random.seed(11)
    np.random.seed(12)
    np.random.normal()  # leaves a cached gaussian in NumPy's legacy state
    torch.manual_seed(13)
    path = save_checkpoint(tmp_path / "ckpt.pth", model=model, optimizer=opt, scheduler=sched, step=4,
                           extra={"best_ap": 0.25, "arch": "nas-fcos"})
    expected_draws = draws()
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = opt.state_dict()
    expected_lr = sched.get_last_lr()

    # Perturb: a differently initialised model, fresh optimiser/scheduler, other RNG states.
    model2, opt2, sched2 = make_training(1)
    train_steps(model2, opt2, sched2, 1)
    random.seed(99)
    np.random.seed(98)
    torch.manual_seed(97)
    assert not torch.equal(model2[0].weight, expected_params["0.weight"])

    info = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert info == {"step": 4, "extra": {"best_ap": 0.25, "arch": "nas-fcos"}}
    for key, value in model2.state_dict().items():
        assert torch.equal(value, expected_params[key]), key
    loaded_opt = opt2.state_dict()
    assert loaded_opt["param_groups"] == expected_opt["param_groups"]
    for idx, state in expected_opt["state"].items():
        assert torch.equal(loaded_opt["state"][idx]["momentum_buffer"], state["momentum_buffer"])
    assert sched2.last_epoch == 4 and sched2.get_last_lr() == expected_lr
    assert draws() == expected_draws

    # Training continues identically from both.
    torch.manual_seed(5)
    train_steps(model, opt, sched, 3)
    torch.manual_seed(5)
    train_steps(model2, opt2, sched2, 3)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_file_is_plain_data_for_weights_only(tmp_path):
    model, opt, sched = make_training(0)
    train_steps(model, opt, sched, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=opt, scheduler=sched, step=1, scaler=scaler)
    data = torch.load(path, weights_only=True)
    assert data["format"] == "nasfcos-checkpoint" and data["step"] == 1
    assert set(data["rng"][0]) >= {"python", "numpy", "torch"}
    assert data["scaler"]["scale"] == scaler.state_dict()["scale"]
    scaler2 = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0)
    load_checkpoint(path, model=make_model(3), scaler=scaler2, restore_rng=False)
    assert scaler2.get_scale() == scaler.get_scale()


def test_restore_rng_false_leaves_generators_alone(tmp_path):
    model = make_model(0)
    torch.manual_seed(1)
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=None, scheduler=None, step=0)
    torch.manual_seed(2)
    expected = torch.rand(2)
    torch.manual_seed(2)
    load_checkpoint(path, model=model, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_rng_state_helpers_round_trip():
    state = get_rng_state()
    first = draws()
    set_rng_state(state)
    assert draws() == first


def test_unsafe_extra_fails_at_save_time(tmp_path):
    with pytest.raises(TypeError, match="extra.when"):
        save_checkpoint(tmp_path / "c.pth", model=make_model(0), optimizer=None, scheduler=None, step=0,
                        extra={"when": object()})
    assert not (tmp_path / "c.pth").exists()


class Payload:
    """Unpickling this object would run ``os.mkdir(marker)``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_file_is_refused_and_never_executes(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    payload = {"format": "nasfcos-checkpoint", "model": Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(UserError, match=r"evil\.pth: cannot load checkpoint safely"):
        load_checkpoint(evil, model=make_model(0))
    assert not marker.exists()

    # The payload is live: an unsafe load really would have run it (so the check above can fail).
    if writer == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        with open(evil, "rb") as handle:
            pickle.load(handle)
    assert marker.is_dir()


def test_wrapped_model_keys_are_stripped(tmp_path):
    model = make_model(0)
    wrapped_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped_state, tmp_path / "ddp_weights.pth")  # a plain state_dict saved from a DDP model
    target = make_model(1)
    info = load_checkpoint(tmp_path / "ddp_weights.pth", model=target)
    assert info == {"step": 0, "extra": {}}
    for key, value in target.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])

    saved = save_checkpoint(tmp_path / "c.pth", model=nn.DataParallel(model), optimizer=None, scheduler=None,
                            step=3)
    assert all(not k.startswith("module.") for k in torch.load(saved, weights_only=True)["model"])
    target = nn.DataParallel(make_model(2))
    load_checkpoint(saved, model=target)
    assert torch.equal(target.module[0].weight, model[0].weight)


def test_mismatching_and_foreign_files_are_user_errors(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=make_model(0), optimizer=None, scheduler=None, step=0)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(UserError, match=r"does not match the model: .*unexpected keys"):
        load_checkpoint(path, model=other)
    bigger = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(80, 2))
    with pytest.raises(UserError, match=r"'0.weight' has shape"):
        load_checkpoint(path, model=bigger)
    with pytest.raises(UserError, match="no optimizer state"):
        load_checkpoint(path, model=make_model(0), optimizer=build_optimizer(make_model(0), 0.1, 0.9, 0.0))
    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="not a nasfcos checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth", model=make_model(0))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth", model=make_model(0))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot load checkpoint safely"):
        load_checkpoint(tmp_path / "garbage.pth", model=make_model(0))


def test_latest_and_rotation(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    model = make_model(0)
    for step in (100, 2000, 300, 40000):  # latest is by step number, not by write order
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, optimizer=None, scheduler=None, step=step)
    (tmp_path / "checkpoint_notes.txt").write_text("ignored")
    assert checkpoint_path(tmp_path, 300).name == "checkpoint_0000300.pth"
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 40000)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100, 300, 2000, 40000]
    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["checkpoint_0000100.pth", "checkpoint_0000300.pth"]
    save_checkpoint(checkpoint_path(tmp_path, 50000), model=model, optimizer=None, scheduler=None, step=50000,
                    keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40000, 50000]
    assert (tmp_path / "checkpoint_notes.txt").exists()
    assert rotate_checkpoints(tmp_path, keep_last=0) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
