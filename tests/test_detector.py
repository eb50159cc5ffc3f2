"""The detector's contract: pre-processing maps boxes exactly, training returns losses, eval returns boxes in
the pixels of the images passed in."""

from __future__ import annotations

import pytest
import torch

import nasfcos
from nasfcos.errors import UserError


def small_detector(arch: str = "fpn-fcos", **kwargs):
    torch.manual_seed(0)
    options = dict(backbone="resnet18", num_classes=3, fpn_width=16, head_width=16, min_size=64, max_size=128)
    options.update(kwargs)
    return nasfcos.build_detector(arch, **options)


def test_preprocess_resizes_pads_and_scales_boxes_by_hand() -> None:
    model = small_detector(min_size=64, max_size=128).train()
    image = torch.rand(3, 100, 50)  # short side 50 -> 64: scale 1.28, long side 128 (exactly the cap)
    target = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2])}
    batch, sizes, scales, originals, scaled = model.preprocess([image], [target])
    assert sizes == [(128, 64)] and originals == [(100, 50)]
    assert scales[0] == pytest.approx((64 / 50, 128 / 100))
    assert batch.shape == (1, 3, 128, 64)  # already multiples of 32
    assert torch.allclose(scaled[0]["boxes"], torch.tensor([[12.8, 25.6, 38.4, 76.8]]))


def test_preprocess_pads_batch_to_multiple_of_32_with_zeros() -> None:
    model = small_detector(min_size=None).eval()
    batch, sizes, _, _, _ = model.preprocess([torch.rand(3, 70, 90), torch.rand(3, 40, 33)])
    assert batch.shape == (2, 3, 96, 96)
    assert sizes == [(70, 90), (40, 33)]
    assert torch.count_nonzero(batch[1, :, 40:, :]) == 0 and torch.count_nonzero(batch[1, :, :, 33:]) == 0


@pytest.mark.parametrize("arch", ["fpn-fcos", "nas-fcos"])
def test_training_returns_finite_losses_and_gradients(arch: str) -> None:
    model = small_detector(arch).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_reg", "loss_ctr"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.decoder.parameters() if p.requires_grad]
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    predictor = model.decoder.head.predictor
    for layer in (predictor.cls_logits, predictor.bbox_pred, predictor.centerness):
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and torch.count_nonzero(grad) > 0


def test_frozen_stem_gets_no_gradient() -> None:
    model = small_detector(freeze_at=2).train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.stages()[0].parameters())
    assert all(not p.requires_grad for p in model.backbone.stages()[1].parameters())


def test_eval_boxes_are_in_original_pixels() -> None:
    model = small_detector(min_size=64, max_size=256, score_thresh=0.0).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 150, 200)])
    assert len(out) == 1 and out[0]["boxes"].shape[0] > 0
    boxes = out[0]["boxes"]
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= 200 and boxes[:, 3].max() <= 150
    # the model saw a 64x85 image; boxes spanning beyond 85 px wide prove they were mapped back
    assert boxes[:, 2].max() > 85


def test_training_mode_requires_targets() -> None:
    with pytest.raises(ValueError, match="targets"):
        small_detector().train()([torch.rand(3, 64, 64)])


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(UserError, match="fcos"):
        small_detector(fcos="bogus")
    with pytest.raises(UserError, match="num_classes"):
        small_detector(num_classes=0)
    with pytest.raises(UserError):
        small_detector(arch="no-such-preset")
