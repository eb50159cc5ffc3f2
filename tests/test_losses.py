"""FCOS losses against formulas written out here, on tiny tensors with hand-known answers."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torchvision.ops import generalized_box_iou

from nasfcos.detection.losses import FCOSLoss, fcos_losses, iou_loss, sigmoid_focal_loss
from nasfcos.detection.targets import FCOSTargets

ALPHA, GAMMA = 0.25, 2.0


def _focal_by_hand(logits: torch.Tensor, onehot: torch.Tensor) -> float:
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), onehot.flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-x))
        if t == 1:
            total += -ALPHA * (1 - p) ** GAMMA * math.log(p)
        else:
            total += -(1 - ALPHA) * p**GAMMA * math.log(1 - p)
    return total


def _bce_by_hand(logits: list[float], targets: list[float]) -> list[float]:
    out = []
    for x, t in zip(logits, targets):
        p = 1.0 / (1.0 + math.exp(-x))
        out.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    return out


def _ltrb_to_xyxy(ltrb: torch.Tensor, x: float = 50.0, y: float = 40.0) -> torch.Tensor:
    l, t, r, b = ltrb.unbind(-1)
    return torch.stack((x - l, y - t, x + r, y + b), dim=-1)


def test_focal_loss_matches_hand_formula():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0], [-0.2, 1.5]], dtype=torch.float64)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert sigmoid_focal_loss(logits, onehot).item() == pytest.approx(_focal_by_hand(logits, onehot), rel=1e-9)


def test_iou_loss_hand_numbers():
    pred = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2], [1, 2, 3, 4]])
    target = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [2, 1, 1, 2]])
    # identical boxes: I = U = 4 -> 0; (2,2,2,2) vs (1,1,1,1): I = 4, U = 16 -> -log(5/17);
    # (1,2,3,4) vs (2,1,1,2): areas 4*6 = 24 and 3*3 = 9, I = (1+1)*(1+2) = 6, U = 27 -> -log(7/28) = log 4
    expected = [0.0, -math.log(5 / 17), math.log(4.0)]
    per_box = iou_loss(pred, target, kind="iou", reduction="none")
    assert per_box.tolist() == pytest.approx(expected, abs=1e-6)
    weight = torch.tensor([0.0, 0.5, 1.0])
    weighted_mean = (0.5 * expected[1] + 1.0 * expected[2]) / 1.5
    assert iou_loss(pred, target, weight, kind="iou").item() == pytest.approx(weighted_mean, rel=1e-6)
    assert iou_loss(pred, target, weight, kind="iou", reduction="sum").item() == pytest.approx(
        0.5 * expected[1] + expected[2], rel=1e-6
    )


def test_giou_loss_matches_torchvision_generalized_box_iou():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(20, 4, generator=gen, dtype=torch.float64) * 30 + 0.5
    target = torch.rand(20, 4, generator=gen, dtype=torch.float64) * 30 + 0.5
    expected = 1 - generalized_box_iou(_ltrb_to_xyxy(pred), _ltrb_to_xyxy(target)).diagonal()
    assert torch.allclose(iou_loss(pred, target, kind="giou", reduction="none"), expected, atol=1e-9)
    # hand value: (1,1,1,1) inside (2,2,2,2): IoU = 4/16, enclosure = union -> GIoU = 0.25, loss 0.75
    one = iou_loss(torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[2.0, 2, 2, 2]]), kind="giou")
    assert one.item() == pytest.approx(0.75)


def _tiny_batch():
    """Two images x three points, K = 2. Image 0 has positives at points 0 (class 0) and 2 (class 1)."""
    cls = torch.tensor(
        [[[1.0, -2.0], [0.3, 0.1], [-1.0, 2.5]], [[-0.5, 0.7], [-2.0, -1.0], [0.0, 0.4]]], requires_grad=True
    )
    reg = torch.tensor(
        [[[2.0, 2, 2, 2], [1, 1, 1, 1], [1, 2, 3, 4]], [[1.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]],
        requires_grad=True,
    )
    ctr = torch.tensor([[0.3, -0.4, 1.2], [0.0, 0.5, -0.5]], requires_grad=True)
    targets = FCOSTargets(
        labels=torch.tensor([[0, -1, 1], [-1, -1, -1]]),
        boxes=torch.zeros(2, 3, 4),
        reg=torch.tensor(
            [[[1.0, 1, 1, 1], [0, 0, 0, 0], [2, 1, 1, 2]], [[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]
        ),
        centerness=torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]]),
        matched=torch.tensor([[0, -1, 1], [-1, -1, -1]]),
    )
    onehot = torch.zeros(2, 3, 2)
    onehot[0, 0, 0] = 1
    onehot[0, 2, 1] = 1
    return cls, reg, ctr, targets, onehot


def test_vanilla_losses_hand_values():
    cls, reg, ctr, targets, onehot = _tiny_batch()
    losses = FCOSLoss(num_classes=2, mode="vanilla")(cls, reg, ctr, targets)
    assert set(losses) == {"loss_cls", "loss_reg", "loss_ctr"}
    focal = _focal_by_hand(cls.detach(), onehot)
    assert losses["loss_cls"].item() == pytest.approx(focal / (2 + 2), rel=1e-5)  # num_pos 2 + 2 images
    # positives: pred (2,2,2,2) vs (1,1,1,1) -> -log(5/17), weight 0.5; (1,2,3,4) vs (2,1,1,2) -> log 4, weight 1
    reg_expected = (0.5 * -math.log(5 / 17) + 1.0 * math.log(4)) / 1.5
    assert losses["loss_reg"].item() == pytest.approx(reg_expected, rel=1e-5)
    bce = _bce_by_hand([0.3, 1.2], [0.5, 1.0])
    assert losses["loss_ctr"].item() == pytest.approx(sum(bce) / 2, rel=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(cls.grad).all() and torch.isfinite(reg.grad).all()
    assert (reg.grad[0, 1] == 0).all() and (reg.grad[1] == 0).all()  # background points get no box gradient


def test_improved_losses_use_giou_and_num_pos():
    cls, reg, ctr, targets, onehot = _tiny_batch()
    losses = fcos_losses(cls, reg, ctr, targets, mode="improved")
    assert losses["loss_cls"].item() == pytest.approx(_focal_by_hand(cls.detach(), onehot) / 2, rel=1e-5)
    # (2,2,2,2) vs (1,1,1,1): GIoU 0.25 -> 0.75. (1,2,3,4) vs (2,1,1,2): I = 6, U = 27,
    # enclosure (2+3)*(2+4) = 30 -> GIoU = 6/27 - 3/30.
    giou_2 = 1 - (6 / 27 - 3 / 30)
    assert losses["loss_reg"].item() == pytest.approx((0.5 * 0.75 + giou_2) / 1.5, rel=1e-5)
    assert losses["loss_ctr"].item() == pytest.approx(sum(_bce_by_hand([0.3, 1.2], [0.5, 1.0])) / 2, rel=1e-5)


@pytest.mark.parametrize("mode", ["vanilla", "improved"])
def test_zero_positives_is_finite_and_differentiable(mode):
    cls, reg, ctr, targets, onehot = _tiny_batch()
    empty = targets._replace(
        labels=torch.full((2, 3), -1), reg=torch.zeros(2, 3, 4), centerness=torch.zeros(2, 3),
        matched=torch.full((2, 3), -1),
    )
    losses = FCOSLoss(2, mode=mode)(cls, reg, ctr, empty)
    focal = _focal_by_hand(cls.detach(), torch.zeros(2, 3, 2))
    assert losses["loss_cls"].item() == pytest.approx(focal / (2 if mode == "vanilla" else 1), rel=1e-5)
    assert losses["loss_reg"].item() == 0.0 and losses["loss_ctr"].item() == 0.0
    assert losses["loss_reg"].requires_grad and losses["loss_ctr"].requires_grad
    sum(losses.values()).backward()
    for tensor in (cls, reg, ctr):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    assert (reg.grad == 0).all() and (ctr.grad == 0).all()


def test_centerness_may_come_with_a_trailing_channel():
    cls, reg, ctr, targets, _ = _tiny_batch()
    a = fcos_losses(cls, reg, ctr, targets)
    b = fcos_losses(cls, reg, ctr[..., None], targets)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError):
        FCOSLoss(2, mode="fancy")


# --- distributed normalisation (two gloo processes on the CPU) -------------------------------------------------


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cls, reg, ctr, targets, _ = _tiny_batch()
        if rank == 1:  # rank 1: all four remaining points positive -> num_pos 2 (rank 0) and 4 (rank 1)
            targets = targets._replace(
                labels=torch.tensor([[0, 0, 1], [1, -1, -1]]),
                reg=torch.ones(2, 3, 4),
                centerness=torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
            )
        losses = fcos_losses(cls, reg, ctr, targets, mode="improved")
        torch.save({k: v.detach() for k, v in losses.items()}, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _fake_two_process_world(monkeypatch, other_rank_values: list[float]) -> None:
    """Pretend to be rank 0 of 2; the other rank contributes ``other_rank_values`` to successive all_reduces."""
    pending = list(other_rank_values)

    def all_reduce(tensor, *args, **kwargs):
        tensor.add_(pending.pop(0))

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


def test_num_pos_normaliser_uses_the_process_mean(monkeypatch):
    # the other rank has 4 positives and a regression-weight sum of 4.0 -> means 3 and 2.75
    _fake_two_process_world(monkeypatch, [4.0, 4.0])
    cls, reg, ctr, targets, onehot = _tiny_batch()
    losses = fcos_losses(cls, reg, ctr, targets, mode="improved")
    assert losses["loss_cls"].item() == pytest.approx(_focal_by_hand(cls.detach(), onehot) / 3, rel=1e-5)
    giou_2 = 1 - (6 / 27 - 3 / 30)
    assert losses["loss_reg"].item() == pytest.approx((0.5 * 0.75 + giou_2) / 2.75, rel=1e-5)
    assert losses["loss_ctr"].item() == pytest.approx(sum(_bce_by_hand([0.3, 1.2], [0.5, 1.0])) / 3, rel=1e-5)


def test_vanilla_normaliser_stays_per_process(monkeypatch):
    _fake_two_process_world(monkeypatch, [])  # any all_reduce would pop from an empty list and fail
    cls, reg, ctr, targets, onehot = _tiny_batch()
    losses = fcos_losses(cls, reg, ctr, targets, mode="vanilla")
    assert losses["loss_cls"].item() == pytest.approx(_focal_by_hand(cls.detach(), onehot) / 4, rel=1e-5)


@pytest.mark.slow
def test_num_pos_normaliser_is_averaged_across_processes():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        result_file = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(init_file, result_file), nprocs=2, join=True)
        rank0 = torch.load(f"{result_file}.0", weights_only=True)
    cls, reg, ctr, targets, onehot = _tiny_batch()
    # rank 0 has 2 positives, rank 1 has 4: every rank divides by the mean, 3.
    assert rank0["loss_cls"].item() == pytest.approx(_focal_by_hand(cls.detach(), onehot) / 3, rel=1e-5)
    # weight sums: rank 0 1.5, rank 1 4.0 -> mean 2.75
    giou_2 = 1 - (6 / 27 - 3 / 30)
    assert rank0["loss_reg"].item() == pytest.approx((0.5 * 0.75 + giou_2) / 2.75, rel=1e-5)
    assert rank0["loss_ctr"].item() == pytest.approx(sum(_bce_by_hand([0.3, 1.2], [0.5, 1.0])) / 3, rel=1e-5)
