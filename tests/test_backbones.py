"""Backbones: taps, channels, strides, ResNeXt-32x4d structure, local weight loading, freezing."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from nasfcos.errors import UserError
from nasfcos.nn.backbones import BACKBONES, build_backbone


def _randomise_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines so that a mis-copied BN shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _resnet_features(model: torchvision.models.ResNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference c2..c5 of a torchvision ResNet, written out from its layer definitions."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for level, layer in zip(("c2", "c3", "c4", "c5"), (model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        out[level] = x
    return out


PAPER_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnext101_32x4d", "mobilenet_v2")


def test_backbone_names() -> None:
    assert set(PAPER_BACKBONES) <= set(BACKBONES)


def _on_meta(name: str, **kwargs) -> nn.Module:
    """Build on PyTorch's meta device: same modules and shapes, no weight initialisation (fast for X-101)."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


@pytest.mark.parametrize("name", PAPER_BACKBONES)
def test_levels_channels_and_strides(name: str) -> None:
    # Shapes only: the meta device propagates them exactly; real values are checked against torchvision below.
    backbone = _on_meta(name).eval()
    assert backbone.out_channels == BACKBONES[name]
    with torch.inference_mode():
        out = backbone(torch.empty(1, 3, 64, 96, device="meta"))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for level, stride in zip(("c2", "c3", "c4", "c5"), (4, 8, 16, 32)):
        assert out[level].shape == (1, BACKBONES[name][level], 64 // stride, 96 // stride), level


def test_channel_table() -> None:
    assert BACKBONES["resnet18"] == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    for name in ("resnet50", "resnet101", "resnext101_32x4d", "resnext101_32x8d"):
        assert BACKBONES[name] == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    assert BACKBONES["mobilenet_v2"] == {"c2": 24, "c3": 32, "c4": 96, "c5": 320}


def test_resnext101_32x4d_is_not_32x8d() -> None:
    backbone = _on_meta("resnext101_32x4d", frozen_bn=False)
    # First bottleneck: width = 64 * (4 / 64) * 32 = 128 channels in 32 groups (32x8d would have 256).
    conv2 = backbone.layer1[0].conv2
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (128, 128, 32)
    assert len(backbone.layer3) == 23
    # Published size of ResNeXt-101 32x4d (ImageNet classifier): 44.18M; the backbone drops fc (2048*1000+1000).
    params = sum(p.numel() for p in backbone.parameters())
    assert abs(params + 2048 * 1000 + 1000 - 44.18e6) < 0.01e6


def test_resnext101_32x8d_is_torchvisions() -> None:
    backbone = _on_meta("resnext101_32x8d", frozen_bn=False)
    conv2 = backbone.layer1[0].conv2
    assert (conv2.out_channels, conv2.groups) == (256, 32)
    params = sum(p.numel() for p in backbone.parameters())
    assert params + 2048 * 1000 + 1000 == 88_791_336  # torchvision's published ResNeXt-101 32x8d size


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UserError) as info:
        build_backbone("vgg16")
    message = str(info.value)
    assert "vgg16" in message and all(name in message for name in BACKBONES)


def test_torchvision_weights_load_and_match_reference(tmp_path) -> None:
    torch.manual_seed(0)
    reference = _randomise_bn_(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.* and num_batches_tracked
    backbone = build_backbone("resnet18", weights=path, frozen_bn=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = _resnet_features(reference, x)
        got = backbone(x)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-5)


def test_mobilenet_weights_and_taps_match_reference(tmp_path) -> None:
    torch.manual_seed(0)
    reference = _randomise_bn_(torchvision.models.mobilenet_v2(weights=None))
    path = tmp_path / "mnv2.pth"
    torch.save(reference.state_dict(), path)  # includes features.18 and classifier
    backbone = build_backbone("mobilenet_v2", weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got = backbone(x)
        h = x
        taps = {}
        for index, block in enumerate(reference.features):
            h = block(h)
            taps[index] = h
    for level, index in zip(("c2", "c3", "c4", "c5"), (3, 6, 13, 17)):
        torch.testing.assert_close(got[level], taps[index], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_timm_style_nested_prefixed_checkpoint(tmp_path, wrapper: str) -> None:
    torch.manual_seed(1)
    reference = _randomise_bn_(torchvision.models.resnet18(weights=None))
    state = {f"module.{key}": value for key, value in reference.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: state, "epoch": 7}, path)
    backbone = build_backbone("resnet18", weights=path, pretrained_format="timm").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x)["c5"], _resnet_features(reference, x)["c5"], rtol=1e-4, atol=1e-5)


def test_renamed_keys_load_by_position_only_when_allowed(tmp_path) -> None:
    """timm renames MobileNetV2's tensors but keeps their order and shapes: auto/timm load by position."""
    torch.manual_seed(2)
    reference = _randomise_bn_(torchvision.models.mobilenet_v2(weights=None))
    state = {
        f"blocks.{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in enumerate(reference.state_dict().items())
    }
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    backbone = build_backbone("mobilenet_v2", weights=path, pretrained_format="auto").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = reference.features[:18](x)
        torch.testing.assert_close(backbone(x)["c5"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="mismatched"):
        build_backbone("mobilenet_v2", weights=path, pretrained_format="torchvision")


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nope" / "r50.pth"
    with pytest.raises(UserError) as info:
        build_backbone("resnet50", weights=path)
    assert str(path) in str(info.value)


def test_mismatched_shape_names_key_shapes_and_count(tmp_path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # expected (128, 64, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", weights=path, pretrained_format="torchvision")
    message = str(info.value)
    assert "layer2.0.conv1.weight" in message
    assert "(128, 64, 3, 3)" in message and "(64, 64, 3, 3)" in message
    assert "1 tensor" in message and str(path) in message and "\n" not in message


def test_wrong_architecture_reports_many_mismatches(tmp_path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", weights=path)
    message = str(info.value)
    assert "resnet18" in message and "layer1.0.conv1.weight" in message
    count = int(message.split(" tensor(s) mismatched")[0].rsplit(" ", 1)[-1])
    assert count > 50


def _requires_grad(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_freeze_at_two_freezes_stem_and_first_stage_only() -> None:
    backbone = build_backbone("resnet50", freeze_at=2, frozen_bn=False)
    assert _requires_grad(backbone.conv1) == {False}
    assert _requires_grad(backbone.bn1) == {False}
    assert _requires_grad(backbone.layer1) == {False}
    for layer in (backbone.layer2, backbone.layer3, backbone.layer4):
        assert _requires_grad(layer) == {True}


@pytest.mark.parametrize("freeze_at,frozen", [(0, 0), (1, 1), (3, 3), (5, 5)])
def test_freeze_levels_resnet18(freeze_at: int, frozen: int) -> None:
    backbone = build_backbone("resnet18", freeze_at=freeze_at, frozen_bn=False)
    stages = [nn.ModuleList([backbone.conv1, backbone.bn1]), backbone.layer1, backbone.layer2,
              backbone.layer3, backbone.layer4]
    for index, stage in enumerate(stages):
        assert _requires_grad(stage) == {index >= frozen}, index


def test_freeze_mobilenet_stem_and_first_stage() -> None:
    backbone = build_backbone("mobilenet_v2", freeze_at=2, frozen_bn=False)
    for index, block in enumerate(backbone.features):
        assert _requires_grad(block) == {index >= 4}, index


def test_freeze_at_out_of_range_is_user_error() -> None:
    with pytest.raises(UserError, match="freeze_at"):
        build_backbone("resnet18", freeze_at=6)


def test_frozen_bn_replaces_every_batchnorm_and_keeps_outputs(tmp_path) -> None:
    torch.manual_seed(3)
    reference = _randomise_bn_(torchvision.models.resnet18(weights=None))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    frozen = build_backbone("resnet18", weights=path, frozen_bn=True).eval()
    plain = build_backbone("resnet18", weights=path, frozen_bn=False).eval()
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == n_bn
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(frozen(x)["c4"], plain(x)["c4"], rtol=1e-4, atol=1e-5)
    # Frozen BN keeps its statistics in training mode too (that is the point of freezing it).
    frozen.train()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x)["c2"], plain(x)["c2"], rtol=1e-4, atol=1e-5)
