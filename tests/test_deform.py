"""Modulated deformable conv: torchvision's semantics, exact gradients, chunking, dispatch, ONNX export.

The independent truth is torchvision's own kernel (``backend="torchvision"``), compared in float64, plus
hand-derived values (a zero-offset DCN is a plain conv times the mask) and finite differences (gradcheck).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from nasfcos.nn import deform
from nasfcos.nn._deform_native import chunk_pixels
from nasfcos.nn.deform import ModulatedDeformConv2d, deform_conv2d

torchvision = pytest.importorskip("torchvision")

RTOL = 1e-9


def _case(
    n: int = 2,
    cin: int = 4,
    h: int = 7,
    w: int = 9,
    cout: int = 6,
    k: int = 3,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    dg: int = 2,
    groups: int = 1,
    offset_scale: float = 3.0,
    use_mask: bool = True,
    use_bias: bool = True,
    seed: int = 0,
):
    """Random float64 inputs; offsets of a few pixels push many samples partly or wholly outside the image."""
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    offset = torch.randn(n, 2 * dg * k * k, ho, wo, generator=g, dtype=torch.float64) * offset_scale
    offset[:, :4] += 2 * max(h, w)  # some samples far outside the image
    weight = torch.randn(cout, cin // groups, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64) if use_bias else None
    mask = torch.rand(n, dg * k * k, ho, wo, generator=g, dtype=torch.float64) if use_mask else None
    return dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask, stride=stride, padding=padding,
                dilation=dilation)


def _run(args: dict, backend: str, grad_seed: int = 1):
    """Output and gradients w.r.t. every tensor argument, for a fixed random output gradient."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if isinstance(v, torch.Tensor)}
    call = {**args, **leaves}
    out = deform_conv2d(**call, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, dict(zip(leaves, grads))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


CASES = {
    "default": {},
    "stride2": dict(stride=2, h=9, w=8),
    "dilation2": dict(dilation=2, padding=2),
    "dilation3_nopad": dict(dilation=3, padding=0, h=11, w=12),
    "pad0": dict(padding=0),
    "pad3": dict(padding=3),
    "dg1": dict(dg=1),
    "dg4": dict(dg=4, cin=8),
    "batch1_nonsquare": dict(n=1, h=5, w=13),
    "weight_groups2": dict(groups=2, cout=4),
    "kernel1": dict(k=1, padding=0),
    "kernel5_dg2": dict(k=5, padding=2, h=6, w=6),
    "no_mask_no_bias": dict(use_mask=False, use_bias=False),
    "tiny_offsets": dict(offset_scale=0.2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torchvision_forward_and_all_gradients(name: str) -> None:
    args = _case(**CASES[name])
    out, grads = _run(args, "native")
    ref_out, ref_grads = _run(args, "torchvision")
    assert out.shape == ref_out.shape
    assert _rel(out, ref_out) < RTOL
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        assert _rel(grads[key], ref_grads[key]) < RTOL, key


@pytest.mark.parametrize("threads,n", [(1, 3), (2, 3), (2, 1), (3, 2)])
def test_chunked_and_threaded_paths_agree(threads: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks force many chunks, several worker threads and (n=1) two workers sharing one image."""
    args = _case(n=n, h=10, w=11, seed=3)
    ref_out, ref_grads = _run(args, "torchvision")
    monkeypatch.setattr(deform, "_chunk_bytes", 4 * 4 * 9 * 2 * 17)  # 17 output pixels per chunk
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = _run(args, "native")
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    assert _rel(out, ref_out) < RTOL
    for key in grads:
        assert _rel(grads[key], ref_grads[key]) < RTOL, key


def test_saved_columns_give_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _case(seed=5)
    ref_out, ref_grads = _run(args, "native")
    monkeypatch.setattr(deform, "_save_bytes", 2**30)
    out, grads = _run(args, "native")
    assert torch.equal(out, ref_out)
    for key in grads:
        assert _rel(grads[key], ref_grads[key]) < 1e-12, key


def test_gradcheck_tiny() -> None:
    args = _case(n=1, cin=2, h=4, w=5, cout=2, dg=1, offset_scale=1.5, seed=7)
    tensors = ("input", "offset", "mask", "weight", "bias")

    def fn(*xs):
        return deform_conv2d(**{**args, **dict(zip(tensors, xs))}, backend="native")

    inputs = tuple(args[k].detach().clone().requires_grad_() for k in tensors)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_close_to_float64_reference() -> None:
    args = _case(n=2, cin=8, cout=8, h=12, w=10, seed=11)
    ref = torchvision.ops.deform_conv2d(
        args["input"], args["offset"], args["weight"], args["bias"], padding=1, mask=args["mask"]
    )
    args32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = deform_conv2d(**args32, backend="native")
    assert out.dtype == torch.float32
    assert _rel(out.double(), ref) < 1e-5


def test_only_some_inputs_require_grad() -> None:
    args = _case(seed=13)
    x = args["input"].clone().requires_grad_()
    out = deform_conv2d(**{**args, "input": x}, backend="native")
    (gx,) = torch.autograd.grad(out.sum(), [x])
    x2 = args["input"].clone().requires_grad_()
    ref = torchvision.ops.deform_conv2d(
        x2, args["offset"], args["weight"], args["bias"], padding=1, mask=args["mask"]
    )
    (gx_ref,) = torch.autograd.grad(ref.sum(), [x2])
    assert _rel(gx, gx_ref) < RTOL


def test_non_contiguous_inputs() -> None:
    args = _case(seed=17)
    ref = deform_conv2d(**args, backend="torchvision")
    strided = dict(args)
    strided["input"] = args["input"].to(memory_format=torch.channels_last)
    both = torch.cat([args["offset"], args["mask"]], dim=1)  # like ModulatedDeformConv2d's slices
    strided["offset"] = both[:, : args["offset"].shape[1]]
    strided["mask"] = both[:, args["offset"].shape[1] :]
    assert not strided["offset"].is_contiguous()
    assert _rel(deform_conv2d(**strided, backend="native"), ref) < RTOL


def test_empty_batch() -> None:
    args = _case(n=0)
    assert deform_conv2d(**args, backend="native").shape == (0, 6, 7, 9)


def test_bfloat16_computes_in_float32() -> None:
    args = _case(seed=19)
    args16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = deform_conv2d(**args16, backend="native")
    assert out.dtype == torch.bfloat16
    ref = deform_conv2d(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args16.items()})
    assert _rel(out.double(), ref) < 2e-2


def test_non_finite_offsets_stay_local_and_do_not_crash() -> None:
    """A diverging run can produce NaN/inf offsets: they must give NaN at those outputs, not an index error."""
    args = _case(n=1, seed=29)
    offset = args["offset"].clone()
    offset[0, 0, 2, 3] = float("nan")  # pixel (2, 3), tap 0 of group 0
    offset[0, 1, 4, 4] = float("inf")
    offset[0, 2, 1, 1] = -1e30  # finite but far outside: contributes zero, like torchvision
    out, grads = _run({**args, "offset": offset}, "native")
    bad = torch.zeros(7, 9, dtype=torch.bool)
    bad[2, 3] = bad[4, 4] = True
    assert torch.isnan(out[0]).any(0).equal(bad)
    finite = {**args, "offset": offset.nan_to_num(nan=0.0, posinf=0.0)}
    finite["offset"][0, 0, 2, 3] = finite["offset"][0, 1, 4, 4] = 1e30
    ref = deform_conv2d(**finite, backend="torchvision")
    assert _rel(out[0][:, ~bad], ref[0][:, ~bad]) < RTOL


def test_forked_child_gets_a_fresh_worker_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker threads do not survive fork(); the child must start its own instead of waiting forever."""
    mp = pytest.importorskip("multiprocessing")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(deform, "_chunk_bytes", 4 * 4 * 9 * 2 * 17)
    args = _case(n=3, seed=31)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = deform_conv2d(**args, backend="native")  # creates the parent's pool
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_conv, args=(args, queue))
        child.start()
        try:
            got = queue.get(timeout=60)
        finally:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(torch.from_numpy(got), expected)


def _child_conv(args: dict, queue) -> None:
    torch.set_num_threads(2)
    queue.put(deform_conv2d(**args, backend="native").numpy())  # numpy: no shared-memory handle to outlive us


# ----------------------------------------------------------------------------------------------- invalid input


def test_invalid_shapes_raise_clear_value_errors() -> None:
    x = torch.randn(1, 6, 5, 5)
    w = torch.randn(4, 6, 3, 3)
    with pytest.raises(ValueError, match=r"input channels \(6\) must be divisible by the deformable groups \(4"):
        deform_conv2d(x, torch.zeros(1, 2 * 4 * 9, 5, 5), w, padding=1)
    with pytest.raises(ValueError, match="offset channels"):
        deform_conv2d(x, torch.zeros(1, 17, 5, 5), w, padding=1)
    with pytest.raises(ValueError, match="offset shape"):
        deform_conv2d(x, torch.zeros(1, 18, 4, 5), w, padding=1)
    with pytest.raises(ValueError, match="mask shape"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), w, padding=1, mask=torch.ones(1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"multiple of weight.shape\[1\] \(4\)"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.randn(4, 4, 3, 3), padding=1)
    with pytest.raises(ValueError, match="bias shape"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), w, torch.zeros(5), padding=1)
    with pytest.raises(ValueError, match="ModulatedDeformConv2d: in_channels \\(6\\) must be divisible"):
        ModulatedDeformConv2d(6, 8, deformable_groups=4)


# ------------------------------------------------------------------------------------------------- dispatch


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    cuda = torch.device("cuda")
    monkeypatch.delenv(deform.ENV_VAR, raising=False)
    assert deform.resolve_backend("auto", cpu) == "native"
    assert deform.resolve_backend("auto", cuda) == "torchvision"
    assert deform.resolve_backend("native", cuda) == "native"
    monkeypatch.setenv(deform.ENV_VAR, "torchvision")
    assert deform.resolve_backend("auto", cpu) == "torchvision"
    assert deform.resolve_backend("native", cpu) == "native"  # an explicit argument wins
    deform.set_backend("native")
    try:
        assert deform.resolve_backend("auto", cpu) == "native"  # the setter beats the environment
    finally:
        deform.set_backend(None)
    assert deform.resolve_backend("auto", cpu) == "torchvision"
    monkeypatch.setenv(deform.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="NASFCOS_DEFORM_BACKEND"):
        deform.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend"):
        deform.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="backend"):
        deform.set_backend("cuda")


def test_auto_backend_does_not_call_torchvision_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(deform.ENV_VAR, raising=False)

    def boom(*args, **kwargs):
        raise AssertionError("torchvision's CPU kernel must not be used")

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", boom)
    args = _case(seed=23)
    deform_conv2d(**args)  # auto -> native
    with pytest.raises(AssertionError, match="must not be used"):
        deform_conv2d(**args, backend="torchvision")


def test_chunk_size_follows_the_byte_budget() -> None:
    args = _case(n=200, cin=8, h=6, w=6)
    geo = deform._geometry(args["input"], args["offset"], args["weight"], None, args["mask"], 1, 1, 1)
    columns_per_pixel = geo.dg * geo.k2 * geo.cg
    for budget in (1, 1000, 2**20, 2**40):
        step = chunk_pixels(geo, 4, budget)
        assert 1 <= step <= geo.pixels
        assert step == 1 or step * columns_per_pixel * 4 <= budget
    with pytest.raises(ValueError):
        deform.set_memory_budget(chunk_bytes=0)


# ---------------------------------------------------------------------------------------------------- module


def test_module_starts_as_half_a_plain_conv() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(8, 6, stride=2, dilation=2, padding=2)
    x = torch.randn(2, 8, 11, 10)
    expected = 0.5 * F.conv2d(x, layer.weight, None, 2, 2, 2) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.offset_mask.out_channels == 2 * 3 * 9
    assert torch.count_nonzero(layer.offset_mask.weight) == 0


def test_module_offset_and_mask_channels_follow_torchvision_layout() -> None:
    torch.manual_seed(1)
    layer = ModulatedDeformConv2d(4, 4, deformable_groups=2).double()
    with torch.no_grad():
        layer.offset_mask.weight.normal_(0, 0.5)
        layer.offset_mask.bias.normal_(0, 1)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    om = layer.offset_mask(x)
    ref = torchvision.ops.deform_conv2d(
        x, om[:, :36], layer.weight, layer.bias, padding=1, mask=torch.sigmoid(om[:, 36:])
    )
    assert _rel(layer(x), ref) < RTOL


def test_module_gradients_reach_offset_conv() -> None:
    torch.manual_seed(2)
    layer = ModulatedDeformConv2d(4, 4)
    layer(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert layer.offset_mask.weight.grad.abs().sum() > 0  # offsets and mask learn from a zero start
    assert layer.weight.grad.abs().sum() > 0


def test_extra_macs_hand_computed() -> None:
    layer = ModulatedDeformConv2d(64, 32, stride=2, deformable_groups=2)
    assert layer.is_deformable
    # 48x48 input, stride 2, padding 1 -> 24x24 output; N=3.
    sampled = 3 * 64 * 9 * 24 * 24
    assert layer.extra_macs((3, 64, 48, 48)) == sampled * 32 + sampled * 5
    assert layer.extra_macs((1, 64, 48, 48)) * 3 == layer.extra_macs((3, 64, 48, 48))


# ------------------------------------------------------------------------------------------------------ ONNX


def _export_model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        ModulatedDeformConv2d(8, 8, stride=2),
        torch.nn.ReLU(),
        ModulatedDeformConv2d(8, 4, dilation=2, padding=2, deformable_groups=1),
    ).eval()
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.offset_mask.weight.normal_(0, 0.3)
            layer.offset_mask.bias.normal_(0, 2)  # offsets of a few pixels, some samples outside the image
    return model, torch.randn(2, 3, 17, 20)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_matches_pytorch(dynamo: bool) -> None:
    """Both exporters (the ``onnx`` extra installs onnx, onnxruntime and onnxscript; no skip)."""
    import onnxruntime as ort

    model, x = _export_model()
    with torch.no_grad():
        expected = model(x).numpy()
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=dynamo, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4 * max(1.0, abs(expected).max())


def test_multithreaded_cpu_path_works_under_inference_mode() -> None:
    """Worker threads must inherit the caller's inference mode (profiling and serving run under it)."""
    import torch

    from nasfcos.nn.deform import ModulatedDeformConv2d

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        module = ModulatedDeformConv2d(32, 32).eval()
        x = torch.randn(8, 32, 64, 64)  # ~37 MB of sampled columns: several chunks, so worker threads run
        with torch.no_grad():
            expected = module(x)
        with torch.inference_mode():
            got = module(x)
        assert torch.allclose(got, expected, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
