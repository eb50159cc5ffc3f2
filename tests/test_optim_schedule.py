"""SGD parameter groups (FACTS 4: bias 2x lr, no decay; frozen excluded) and the warmup multi-step schedule."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nasfcos.config import SolverConfig, load_config
from nasfcos.train.optim import build_optimizer, build_optimizer_from_config
from nasfcos.train.schedule import WarmupMultiStepLR, build_scheduler_from_config, lr_factor


class Tiny(nn.Module):
    """conv (w+b) -> BN (w+b) -> GN (w+b) -> frozen conv (w+b) -> shared linear used twice; a bias-free conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.frozen = nn.Conv2d(4, 4, 1)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.nobias = nn.Conv2d(4, 4, 1, bias=False)
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared  # same parameters reachable twice
        self.scale = nn.Parameter(torch.ones(1))  # FCOS per-level scale: a plain weight


def ids(params) -> set[int]:
    return {id(p) for p in params}


def group(opt: torch.optim.Optimizer, name: str) -> dict:
    (found,) = [g for g in opt.param_groups if g["name"] == name]
    return found


def test_param_groups_bias_double_lr_no_decay_frozen_excluded():
    model = Tiny()
    opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert [g["name"] for g in opt.param_groups] == ["default", "bias"]
    default, bias = group(opt, "default"), group(opt, "bias")
    assert ids(default["params"]) == ids([model.conv.weight, model.bn.weight, model.gn.weight,
                                          model.nobias.weight, model.shared.weight, model.scale])
    assert ids(bias["params"]) == ids([model.conv.bias, model.bn.bias, model.gn.bias, model.shared.bias])
    assert (default["lr"], default["weight_decay"]) == (0.01, 1e-4)
    assert (bias["lr"], bias["weight_decay"]) == (0.02, 0.0)
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # shared parameters appear once
    assert not ids([model.frozen.weight, model.frozen.bias]) & set(all_ids)
    assert opt.defaults["momentum"] == 0.9


def test_norm_weight_decay_group():
    model = Tiny()
    opt = build_optimizer(model, 0.01, 0.9, 1e-4, bias_lr_factor=1.0, bias_weight_decay=1e-5, norm_weight_decay=0.0)
    norm = group(opt, "norm")
    assert ids(norm["params"]) == ids([model.bn.weight, model.gn.weight])
    assert (norm["lr"], norm["weight_decay"]) == (0.01, 0.0)
    assert (group(opt, "bias")["lr"], group(opt, "bias")["weight_decay"]) == (0.01, 1e-5)


def test_bias_update_follows_its_group():
    """One SGD step without momentum: dw = -lr*(g + wd*w) on weights, -2*lr*g on biases."""
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    opt = build_optimizer(layer, base_lr=0.1, momentum=0.0, weight_decay=0.5)
    layer(torch.tensor([[1.0, 2.0]])).sum().backward()  # grads: weight [1, 2], bias 1
    opt.step()
    assert torch.allclose(layer.weight, torch.tensor([[1 - 0.1 * (1 + 0.5), 1 - 0.1 * (2 + 0.5)]]))
    assert torch.allclose(layer.bias, torch.tensor([1 - 0.2 * 1.0]))


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, 0.01, 0.9, 1e-4)


def make_scheduler(**kwargs) -> tuple[torch.optim.Optimizer, WarmupMultiStepLR]:
    opt = build_optimizer(nn.Linear(2, 2), base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    return opt, WarmupMultiStepLR(opt, steps=(60000, 80000), **kwargs)


@pytest.mark.parametrize(
    ("iteration", "factor"),
    [(0, 1 / 3), (250, 2 / 3), (499, 1 / 3 + (2 / 3) * 499 / 500), (500, 1.0), (59999, 1.0), (60000, 0.1),
     (79999, 0.1), (80000, 0.01), (89999, 0.01)],
)
def test_lr_factor_hand_values(iteration, factor):
    assert lr_factor(iteration, (60000, 80000)) == pytest.approx(factor, rel=1e-12)


def test_scheduler_sets_group_lrs_per_iteration():
    opt, sched = make_scheduler()
    seen = {}
    checkpoints = {0, 250, 500, 59999, 60000, 80000}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler before optimizer" or get_lr warnings
        opt.step()  # one real step first (torch checks the call order); the schedule depends only on the count
        for it in range(80001):
            if it in checkpoints:
                seen[it] = [g["lr"] for g in opt.param_groups]
                assert sched.get_last_lr() == seen[it]
            sched.step()
    expected = {0: 1 / 3, 250: 2 / 3, 500: 1.0, 59999: 1.0, 60000: 0.1, 80000: 0.01}
    for it, factor in expected.items():
        assert seen[it] == pytest.approx([0.01 * factor, 0.02 * factor], rel=1e-9), it


def test_constant_warmup_and_no_warmup():
    assert lr_factor(10, (100,), warmup_method="constant", warmup_factor=0.1, warmup_iters=50) == 0.1
    assert lr_factor(0, (100,), warmup_iters=0) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, (1,), warmup_method="cosine")
    with pytest.raises(ValueError):
        make_scheduler(warmup_method="exp")


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    opt, sched = make_scheduler(warmup_iters=10)
    for _ in range(7):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pth")
    state = torch.load(tmp_path / "s.pth", weights_only=True)  # plain data only

    opt2, sched2 = make_scheduler(warmup_iters=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert sched2.get_last_lr() == pytest.approx([0.01, 0.02])  # iteration 12: warmup over


def test_from_config():
    cfg = load_config(SolverConfig, overrides=["base_lr=0.1", "steps=5,8", "warmup_iters=2", "bias_lr_factor=3"])
    model = nn.Linear(2, 2)
    opt = build_optimizer_from_config(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(0.3)]
    sched = build_scheduler_from_config(opt, cfg)
    assert sched.factor(0) == pytest.approx(1 / 3) and sched.factor(5) == pytest.approx(0.1)
    assert sched.factor(8) == pytest.approx(0.01)
