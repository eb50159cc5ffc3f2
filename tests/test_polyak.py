"""Polyak averaging: the exact formula over several optimiser steps, buffers, swap-in and restore."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nasfcos.search.polyak import PolyakAverager


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _train_steps(model: nn.Module, averager: PolyakAverager, steps: int, record: list | None = None) -> None:
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 5, 5, generator=g)
        loss = model(x).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        averager.update()
        if record is not None:
            record.append({k: v.detach().clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_average_matches_the_formula_over_several_steps(decay):
    model = _model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    averager = PolyakAverager(model, decay=decay)
    history: list[dict[str, torch.Tensor]] = []
    _train_steps(model, averager, steps=6, record=history)
    # Independent recomputation in float64: avg_0 = p_0, avg_k = d avg_{k-1} + (1 - d) p_k.
    averaged = averager.averaged_state()
    differs_from_last = []
    for name, _ in model.named_parameters():
        expected = initial[name].double()
        for snapshot in history:
            expected = decay * expected + (1 - decay) * snapshot[name].double()
        torch.testing.assert_close(averaged[name].double(), expected, rtol=1e-5, atol=1e-6)
        differs_from_last.append(not torch.allclose(averaged[name], history[-1][name]))
    assert sum(differs_from_last) >= 3  # it is not just the last iterate (a bias before BN never moves)
    # Buffers are copied by default: running statistics equal the live model's.
    for name, buffer in model.named_buffers():
        assert torch.equal(averaged[name], buffer)
    assert averager.num_updates == 6


def test_buffers_can_be_averaged_too():
    model = _model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    averager = PolyakAverager(model, decay=0.9, buffers="average")
    history: list[dict[str, torch.Tensor]] = []
    _train_steps(model, averager, steps=3, record=history)
    expected = initial["1.running_mean"]
    for snapshot in history:
        expected = 0.9 * expected + 0.1 * snapshot["1.running_mean"]
    torch.testing.assert_close(averager.averaged_state()["1.running_mean"], expected)
    # Integer counters are copied, never averaged.
    assert int(averager.averaged_state()["1.num_batches_tracked"]) == 3


def test_swap_in_uses_averaged_weights_and_restores_the_trained_ones():
    model = _model()
    averager = PolyakAverager(model, decay=0.9)
    _train_steps(model, averager, steps=4)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 5, 5)
    reference = averager.averaged_model().eval()(x)
    model.eval()
    with averager.swap_in() as swapped:
        assert swapped is model
        for name, value in averager.averaged_state().items():
            assert torch.equal(model.state_dict()[name], value)
        torch.testing.assert_close(model(x), reference)
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name])
    # Restored even when validation raises.
    with pytest.raises(RuntimeError):
        with averager.swap_in():
            raise RuntimeError("validation failed")
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name])


def test_state_dict_roundtrip():
    model = _model()
    averager = PolyakAverager(model, decay=0.9)
    _train_steps(model, averager, steps=2)
    buffer = io.BytesIO()
    torch.save(averager.state_dict(), buffer)
    buffer.seek(0)
    other = PolyakAverager(model, decay=0.5)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.decay == 0.9 and other.num_updates == 2
    for name, value in averager.averaged_state().items():
        assert torch.equal(other.averaged_state()[name], value)


def test_invalid_decay():
    with pytest.raises(ValueError):
        PolyakAverager(_model(), decay=1.0)
