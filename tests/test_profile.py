"""Profiler: MAC counting rules (hand-computed), deformable convs, FlopCounterMode cross-check, Table 2 scale,
the meta-device shortcut, and the ``nasfcos profile`` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nasfcos.analysis.profile import parse_size, profile, profile_parts
from nasfcos.detection.detector import build_detector
from nasfcos.cli import main
from nasfcos.errors import UserError


def _macs(module: nn.Module, *shape: int) -> int:
    return profile(module, example_inputs=torch.randn(*shape))["macs"]


def test_conv2d_with_groups_stride_dilation_hand_computed() -> None:
    conv = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=2, dilation=2, groups=4)
    # Hout = floor((17 + 4 - 2*2 - 1) / 2) + 1 = 9, Wout = floor((19 + 4 - 5) / 2) + 1 = 10
    # MACs = N * Cout * (Cin / groups) * kh * kw * Hout * Wout = 2 * 16 * 2 * 9 * 9 * 10; bias not counted
    result = profile(conv, example_inputs=torch.randn(2, 8, 17, 19))
    assert result["macs"] == 2 * 16 * 2 * 9 * 9 * 10 == 51840
    assert result["params"] == 16 * 2 * 9 + 16
    assert result["gmacs"] == pytest.approx(51840 / 1e9)
    assert result["size"] == [17, 19]


def test_linear_and_transposed_conv_hand_computed() -> None:
    assert _macs(nn.Linear(10, 7), 3, 5, 10) == 3 * 5 * 7 * 10
    # Transposed conv: every input value is multiplied into Cout/groups * kh * kw outputs.
    assert _macs(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), 1, 4, 5, 5) == 4 * 3 * 9 * 25


def test_norms_activations_upsampling_are_not_counted() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4), nn.Upsample(scale_factor=2))
    result = profile(model, example_inputs=torch.randn(1, 4, 8, 8))
    assert result["macs"] == 0
    assert result["params"] == 4 * 2 + 4 * 2


def test_shared_module_counts_macs_per_call_and_params_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    result = profile(Twice(), example_inputs=torch.randn(1, 3, 4, 4))
    assert result["macs"] == 2 * (3 * 3 * 16)
    assert result["params"] == 9


def test_deformable_conv_counts_main_offset_and_sampling() -> None:
    from nasfcos.nn.deform import ModulatedDeformConv2d

    layer = ModulatedDeformConv2d(8, 12, kernel_size=3, stride=1, padding=1, deformable_groups=2)
    n, h, w = 2, 10, 10
    main_conv = n * 12 * 8 * 9 * h * w  # the deformable conv's own weights
    offset_conv = n * (2 * 3 * 9) * 8 * 9 * h * w  # plain 3x3 conv predicting 2 groups x (dx, dy, mask) x 9 taps
    sampling = n * 8 * 9 * h * w * 5  # 4 MACs bilinear interpolation + 1 mask multiply per sampled value
    result = profile(layer, example_inputs=torch.randn(n, 8, h, w))
    assert result["macs"] == main_conv + offset_conv + sampling == 1_022_400
    assert result["params"] == 12 * 8 * 9 + 12 + 54 * 8 * 9 + 54


def test_extra_macs_hook_on_any_module() -> None:
    class Custom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        def extra_macs(self, input_shape: tuple[int, ...]) -> int:
            return 7 * input_shape[0]

    model = nn.Sequential(Custom(), nn.Conv2d(2, 2, 1, bias=False))
    assert _macs(model, 3, 2, 4, 4) == 21 + 3 * 2 * 2 * 16


def test_matches_torch_flop_counter_on_small_cnn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32, bias=False),
        nn.Conv2d(32, 24, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    ).eval()
    x = torch.randn(2, 3, 37, 45)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == 2 * profile(model, example_inputs=x)["macs"]


def test_latency_fields_and_state_restored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    threads_before = torch.get_num_threads()
    result = profile(model, size=(32, 40), latency=True, threads=1, warmup=0, repeats=3)
    assert result["threads"] == 1 and result["repeats"] == 3
    assert 0 < result["latency_ms_median"] <= result["latency_ms_p90"]
    assert model.training and torch.get_num_threads() == threads_before
    assert result["macs"] == 4 * 3 * 9 * 30 * 38


def test_forward_fn_override() -> None:
    conv = nn.Conv2d(3, 5, 1, bias=False)
    result = profile(conv, size=(8, 8), forward_fn=lambda m, x: m(x[:, :, :4, :4]))
    assert result["macs"] == 5 * 3 * 16


def test_default_forward_prefers_forward_raw_then_backbone_decoder() -> None:
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 1, bias=False)
            self.decoder = nn.Conv2d(4, 2, 1, bias=False)

        def forward(self, images: list[torch.Tensor]) -> list[dict]:
            raise AssertionError("the profiler must not run post-processing")

    detector = Detector()
    assert profile(detector, size=(4, 4))["macs"] == (4 * 3 + 2 * 4) * 16
    detector.forward_raw = lambda images: detector.backbone(images)  # forward_raw wins when present
    assert profile(detector, size=(4, 4))["macs"] == 4 * 3 * 16


def test_parts_add_up_and_meta_equals_real() -> None:
    model = build_detector("nas-fcos@32", backbone="resnet18", num_classes=3)
    real = profile_parts(model, size=(64, 64))
    meta = profile_parts(model, size=(64, 64), meta=True)
    assert real == meta
    assert set(real) == {"whole", "backbone", "decoder"}
    for key in ("params", "macs"):
        assert real["whole"][key] == real["backbone"][key] + real["decoder"][key]
    assert real["backbone"]["macs"] == profile(model.backbone, size=(64, 64))["macs"]
    assert real["decoder"]["params"] == sum(p.numel() for p in model.decoder.parameters())


def test_fpn_fcos_resnet50_matches_table2_scale() -> None:
    """Table 2: FPN-FCOS @256, R-50, 1088x800: 32.0M params, 169.9 GFLOPs (= GMACs)."""
    model = build_detector("fpn-fcos", backbone="resnet50", num_classes=80)
    result = profile(model, size=(800, 1088), meta=True)
    assert abs(result["params"] / 32.0e6 - 1) < 0.03
    assert abs(result["gmacs"] / 169.9 - 1) < 0.10
    # Independent check of the backbone part: ResNet-50 without fc = 25.557M - 2.049M parameters.
    parts = profile_parts(model, size=(800, 1088), meta=True)
    assert parts["backbone"]["params"] == 25_557_032 - (2048 * 1000 + 1000)


def test_parse_size() -> None:
    assert parse_size("800x1088") == (800, 1088)
    for bad in ("800", "800x", "axb", "16x16", "1x2x3"):
        with pytest.raises(UserError, match="--size"):
            parse_size(bad)


def test_detector_forward_raw_is_backbone_then_decoder() -> None:
    """What the profiler counts for a detector: backbone + decoder, no pre/post-processing."""
    torch.manual_seed(0)
    model = build_detector("fpn-fcos", backbone="resnet18", num_classes=3, fpn_width=16, head_width=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw, direct = model.forward_raw(x), model.decoder(model.backbone(x))
    for ours, reference in zip(raw, direct):
        assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_profile_command_prints_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    code = main(["profile", "--arch", "fpn-fcos", "--backbone", "resnet18", "--size", "64x96", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| whole network (backbone + decoder) |" in printed and "| decoder (FPN + head) |" in printed
    record = json.loads(out.read_text())
    assert record["size"] == [64, 96] and record["backbone"] == "resnet18"
    # FCOS decoder on ResNet-18 channels (128, 256, 512), width 256, 80 classes, written out by hand:
    lateral = (128 + 256 + 512) * 256 + 3 * 256
    conv3x3 = 256 * 256 * 9 + 256
    fpn = lateral + 3 * conv3x3 + 2 * conv3x3  # P3..P5 outputs, P6, P7
    towers = 2 * 4 * (conv3x3 + 2 * 256)  # 4 conv3x3 + GN per tower
    predictors = (256 * 80 * 9 + 80) + (256 * 4 * 9 + 4) + (256 * 9 + 1) + 5  # cls, box, centerness, scales
    assert record["decoder"]["params"] == fpn + towers + predictors
    assert record["whole"]["params"] == record["decoder"]["params"] + 11_689_512 - (512 * 1000 + 1000)
    assert f"{record['decoder']['params'] / 1e6:.2f}" in printed


def test_profile_command_latency_and_widths(capsys) -> None:
    code = main(["profile", "--arch", "nas-fcos", "--backbone", "resnet18", "--size", "64x64",
                 "--fpn-width", "32", "--head-width", "64", "--latency", "--threads", "1",
                 "--warmup", "0", "--repeats", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "FPN width 32, head width 64" in printed and "latency median (ms)" in printed


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--size", "64by64"], "--size"),
        (["--arch", "no-such-preset", "--size", "64x64"], "no-such-preset"),
        (["--backbone", "vgg", "--size", "64x64"], "vgg"),
        (["--num-classes", "0", "--size", "64x64"], "--num-classes"),
    ],
)
def test_profile_command_user_errors(argv: list[str], needle: str, capsys) -> None:
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
