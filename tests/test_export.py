"""ONNX export of whole detectors: the lowered deformable conv, the in-graph post-processing, ONNX Runtime checks.

Independent truths: torchvision's deformable-conv kernel (float64) for the lowered DCN; the detector's own
``model(images)`` (``detection.postprocess`` + torchvision NMS + the native DCN path) for the exported graph,
run in ONNX Runtime; hand-written option errors. The export tests use small widths, small images and random
weights (perturbed so that detections have distinct scores), so each export takes seconds.
"""

from __future__ import annotations

import random

import numpy as np
import onnx  # the onnx extra (scripts/setup.sh installs it): a missing package fails here instead of skipping
import onnxruntime as ort
import pytest
import torch
import torchvision

import nasfcos
from nasfcos.errors import UserError
from nasfcos.export import export_onnx
from nasfcos.export.check import MATCH_IOU, RAW_ATOL, RAW_RTOL
from nasfcos.export.graph import DeployGraph
from nasfcos.nn._deform_export import deform_conv2d_exportable
from nasfcos.nn.deform import ModulatedDeformConv2d, _geometry
from nasfcos.space.ops import AGGREGATIONS, FPN_OPS, HEAD_OPS



# ------------------------------------------------------------------------------------- the lowered DCN (eager)


@pytest.mark.parametrize(
    "stride, padding, dilation, dg, groups, use_mask, h, w",
    [
        (1, 1, 1, 2, 1, True, 7, 9),
        (2, 1, 1, 1, 1, True, 8, 5),
        (1, 2, 2, 2, 2, False, 6, 10),
        (2, 0, 1, 4, 2, True, 9, 9),
        (1, 1, 1, 1, 1, True, 1, 1),  # 1x1 input: every tap but the centre is outside
    ],
)
def test_lowered_deform_conv_matches_torchvision(stride, padding, dilation, dg, groups, use_mask, h, w) -> None:
    g = torch.Generator().manual_seed(0)
    n, cin, cout, k = 2, 8, 6, 3
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(n, 2 * dg * k * k, ho, wo, generator=g, dtype=torch.float64) * 3
    offset[:, :4] += 2 * max(h, w)  # some samples wholly outside the image
    offset.requires_grad_()
    weight = torch.randn(cout, cin // groups, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(n, dg * k * k, ho, wo, generator=g, dtype=torch.float64, requires_grad=True) if use_mask else None
    geo = _geometry(x, offset, weight, bias, mask, stride, padding, dilation)
    got = deform_conv2d_exportable(x, offset, mask, weight, bias, geo)
    expected = torchvision.ops.deform_conv2d(
        x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # Differentiable too (it serves empty batches and torch.compile): same gradients as torchvision's kernel.
    leaves = [t for t in (x, offset, weight, bias, mask) if t is not None]
    grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------------------- models for tests


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets of a few pixels in every DCN and spread-out predictions, so scores are distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulatedDeformConv2d):
                module.offset_mask.weight.copy_(torch.randn(module.offset_mask.weight.shape, generator=g) * 0.02)
                module.offset_mask.bias.copy_(torch.randn(module.offset_mask.bias.shape, generator=g) * 2.0)
        predictor = model.decoder.head.predictor
        for conv in (predictor.cls_logits, predictor.centerness, predictor.bbox_pred):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        predictor.cls_logits.bias.fill_(-2.0)
    return model.eval()


def _small(arch, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = {"backbone": "resnet18", "num_classes": 3, "fpn_width": 16, "head_width": 16, "min_size": 160, **options}
    return _perturb(nasfcos.build_detector(arch, **options), seed)


def _every_op_genotype() -> nasfcos.Genotype:
    """A sampled genotype whose used FPN cells have every FPN op and aggregation, and whose head every head op."""
    from nasfcos.nn.fpn import SearchedFPN

    space = nasfcos.SearchSpace(head="sequential")
    rng = random.Random(0)
    for _ in range(20000):
        genotype = space.sample(rng)
        if set(genotype.head.ops) != set(HEAD_OPS):
            continue
        if {op for c in genotype.fpn for op in (c.op1, c.op2)} != set(FPN_OPS):
            continue
        fpn = SearchedFPN(genotype.fpn, {"c2": 8, "c3": 8, "c4": 8, "c5": 8}, 8)
        used = [genotype.fpn[int(i) - 4] for i in fpn.cells]
        if {op for c in used for op in (c.op1, c.op2)} == set(FPN_OPS) and {c.agg for c in used} == set(AGGREGATIONS):
            return genotype
    raise AssertionError("no sampled genotype uses every op")


def _graph_ops(data: bytes) -> dict[str, int]:
    model = onnx.load_from_string(data)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx"), f"non-standard op {node.domain}::{node.op_type}"
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _num_dcn(model: torch.nn.Module) -> int:
    return sum(isinstance(m, ModulatedDeformConv2d) for m in model.modules())


def _dcn_calls(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """Deformable convs run by one forward pass (a head layer shared by the 5 levels runs 5 times)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, ModulatedDeformConv2d)]
    try:
        with torch.no_grad():
            model.forward_raw(torch.zeros(1, 3, *size))
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


# --------------------------------------------------------------------- the in-graph post-processing (eager)


@pytest.mark.parametrize("fcos", ["vanilla", "improved"])
def test_graph_postprocess_equals_detector_postprocess(fcos: str) -> None:
    """The masked top-k + per-image NMS formulation gives ``model(images)``'s detections, cap and order included."""
    model = _small("nas-fcos@16", num_classes=5, fcos=fcos, min_size=None, pre_nms_top_n=40,
                   detections_per_img=15, nms_thresh=0.5, score_thresh=0.1)
    images = torch.rand(2, 3, 150, 200, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(list(images))
        boxes, scores, labels, image_index = DeployGraph(model, postprocess=True, pad=True)(images)
    assert sum(len(e["boxes"]) for e in expected) >= 20  # the cap and the top-k are exercised
    for i, ref in enumerate(expected):
        chosen = image_index == i
        assert len(ref["boxes"]) <= 15
        torch.testing.assert_close(boxes[chosen], ref["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(scores[chosen], ref["scores"], rtol=1e-6, atol=1e-6)
        assert torch.equal(labels[chosen], ref["labels"])


# ----------------------------------------------------------------------------------------- option errors


def test_unsupported_options_are_one_line_user_errors(tmp_path) -> None:
    model = _small("fpn-fcos")
    target = tmp_path / "m.onnx"
    cases = [
        ({"opset": 12}, "opset"),
        ({"opset": 99}, "opset"),
        ({"size": (160, 160), "dynamic": True}, "size"),
        ({"size": (16, 160)}, "size"),
        ({"batch": 0}, "batch"),
        ({"dynamic": True, "batch": 2}, "batch"),
    ]
    for options, field in cases:
        with pytest.raises(UserError) as info:
            export_onnx(model, target, **options)
        assert str(info.value).startswith(field) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="FCOSDetector"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), target)
    no_resize = _small("fpn-fcos", min_size=None)
    with pytest.raises(UserError, match="min_size=None"):
        export_onnx(no_resize, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ ONNX Runtime


def test_dcn_layer_dynamic_shapes_in_onnxruntime() -> None:
    """One deformable conv exported once runs at other sizes and batches (dims come from the tensors)."""
    torch.manual_seed(1)
    layer = ModulatedDeformConv2d(8, 8, stride=2).eval()
    with torch.no_grad():
        layer.offset_mask.weight.normal_(0, 0.3)
        layer.offset_mask.bias.normal_(0, 2)
    dim = torch.export.Dim
    program = torch.onnx.export(
        layer, (torch.randn(2, 8, 12, 14),), dynamo=True, input_names=["x"],
        dynamic_shapes=({0: dim("n"), 2: dim("h", min=4), 3: dim("w", min=4)},),
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 9, 20), (3, 8, 16, 7)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = layer(x).numpy()  # the native path
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= RAW_ATOL + RAW_RTOL * np.abs(expected).max()


def test_fpn_fcos_raw_outputs_fixed_size(tmp_path) -> None:
    model = _small("fpn-fcos")
    target = tmp_path / "fpn.onnx"
    result = export_onnx(model, target, size=(160, 224), postprocess=False)
    assert result.check is not None and result.check.ok, result.summary()
    assert result.check.worst_fraction <= 1.0 and len(result.output_names) == 15
    data = target.read_bytes()
    assert len(data) == result.num_bytes and _graph_ops(data).get("GridSample", 0) == 0
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in session.get_inputs()] == [(1, 3, 160, 224)]
    outputs = session.run(None, {"images": torch.rand(1, 3, 160, 224).numpy()})
    assert [o.shape[-2:] for o in outputs[:5]] == [(20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]


def test_nas_fcos_postprocessed_dynamic(tmp_path) -> None:
    """DCN in FPN and head, NMS in the graph, checked at two sizes and two batch sizes by the built-in check."""
    model = _small("nas-fcos@16", score_thresh=0.2)
    assert _num_dcn(model.decoder.fpn) > 0 and _num_dcn(model.decoder.head) > 0
    result = export_onnx(model, tmp_path / "nas.onnx", dynamic=True)
    report = result.check
    assert report is not None and report.ok, result.summary()
    assert {s[0] for s in report.shapes} == {1, 2} and len({s[2:] for s in report.shapes}) == 2
    assert report.num_reference >= 10 and report.num_matched == report.num_reference == report.num_onnx
    assert report.min_iou >= MATCH_IOU
    ops = _graph_ops((tmp_path / "nas.onnx").read_bytes())
    assert ops["GridSample"] == _dcn_calls(model, (160, 160)) and ops["NonMaxSuppression"] == 1 and "DeformConv" not in ops
    # One more size and batch than the check used, directly.
    session = ort.InferenceSession(str(tmp_path / "nas.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 192, 288, generator=torch.Generator().manual_seed(5))
    boxes, scores, labels, image_index = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        model.min_size = model.test_min_size = None
        expected = model(list(images))
    assert sorted(np.unique(image_index).tolist()) == [i for i, e in enumerate(expected) if len(e["boxes"])]
    for i, ref in enumerate(expected):
        chosen = image_index == i
        assert labels[chosen].tolist() == ref["labels"].tolist()
        np.testing.assert_allclose(boxes[chosen], ref["boxes"].numpy(), rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(scores[chosen], ref["scores"].numpy(), atol=1e-4)


def test_sampled_genotype_with_every_op_improved_fcos(tmp_path) -> None:
    """Every FPN op, both aggregations, every head op; an input size that the graph pads; the newest opset."""
    genotype = _every_op_genotype()
    model = _small(genotype, fcos="improved", fpn_width=16, head_width=16)
    result = export_onnx(model, tmp_path / "every.onnx", size=(150, 200), batch=2, opset=23, postprocess=False)
    assert result.check is not None and result.check.ok, result.summary()
    assert result.check.shapes == [(2, 3, 150, 200)] * 2
    ops = _graph_ops((tmp_path / "every.onnx").read_bytes())
    assert ops["GridSample"] == _dcn_calls(model, (160, 224)) > 0 and ops["Pad"] >= 1


def test_cli_exports_a_trained_checkpoint(tiny_trained_run, tmp_path, capsys) -> None:
    from nasfcos.cli import main

    target = tmp_path / "deploy" / "model.onnx"
    checkpoint = str(tiny_trained_run / "model_final.pt")
    assert main(["export", "--checkpoint", checkpoint, "--out", str(target), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "check: ONNX Runtime vs PyTorch on 3 images" in printed and printed.rstrip().endswith(": OK")
    model = onnx.load(str(target))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["nasfcos.class_names"].startswith("[") and props["nasfcos.postprocess"] == "true"
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "batch_index"]
    # Mistakes: one line on stderr, exit 2, nothing written.
    bad = tmp_path / "bad.onnx"
    for argv in (["--size", "96x96", "--dynamic"], ["--size", "96"], ["--opset", "11"], ["--batch", "0"]):
        assert main(["export", "--checkpoint", checkpoint, "--out", str(bad), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(bad)]) == 2
    assert not bad.exists()


def test_export_latency_benchmark_quick(tmp_path) -> None:
    """The benchmark script runs (tiny settings) and writes its JSON; its numbers are consistent, not asserted."""
    import importlib
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    threads = torch.get_num_threads()
    try:
        record = importlib.import_module("export_latency").main(["--quick", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "export_latency.json").read_text())
    assert data["benchmark"] == "export_latency" and data["machine"]["torch_threads"] == 1
    rows = {(r["model"], r["runtime"]): r for r in data["results"]}
    assert set(rows) == {("fpn-fcos", "pytorch"), ("fpn-fcos", "onnxruntime")}
    for row in rows.values():
        assert row["median_ms"] > 0 and row["file_mib"] > 0 and row["repeats"] == 2
        assert row["ratio_to_pytorch"] == pytest.approx(row["median_ms"] / rows[("fpn-fcos", "pytorch")]["median_ms"])
    assert record["results"] == data["results"]


@pytest.mark.parametrize("postprocess", [False, True])
def test_check_fails_when_the_file_computes_something_else(postprocess: bool) -> None:
    """The built-in check must be able to fail: the file checked against a model with other weights is caught."""
    import copy

    from nasfcos.export import exporter
    from nasfcos.export.check import check_onnx, default_check_batches
    from nasfcos.export.graph import POSTPROCESS_OUTPUTS, raw_output_names

    model = _small("fpn-fcos", score_thresh=0.2)
    names = list(POSTPROCESS_OUTPUTS if postprocess else raw_output_names())
    data = exporter._export_bytes(
        DeployGraph(model, postprocess=postprocess, pad=True), torch.rand(1, 3, 96, 128), names, 18, None, "", {}
    )
    batches = default_check_batches(model, (96, 128), 1)
    assert check_onnx(model, data, batches, postprocess=postprocess).ok
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder.head.predictor.bbox_pred.bias.add_(0.5)  # boxes ~65 % larger
        other.decoder.head.predictor.cls_logits.bias.add_(0.3)  # scores higher
    report = check_onnx(other, data, batches, postprocess=postprocess)
    assert not report.ok and report.problems and report.lines()[0].endswith("FAILED")
    if postprocess:
        assert report.num_reference > 0 and report.num_matched < report.num_reference
    else:
        assert report.worst_fraction > 1.0
