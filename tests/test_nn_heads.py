"""nn/heads.py: per-level partial weight sharing, the cell head, FCOS predictors and their init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nasfcos.errors import UserError
from nasfcos.nn.heads import CellHeadModule, FCOSHead, SequentialHeadModule
from nasfcos.space.genotype import CellHead, HeadCell, SequentialHead

C = 16
LEVEL_SIZES = [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]


pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Hand-counted parameters per op at width C (GN has 2C affine parameters).
_DCN = 9 * C * C + C + 54 * C * 9 + 54
OP_PARAMS = {
    "conv1x1": C * C + C + 2 * C,
    "conv3x3": 9 * C * C + C + 2 * C,
    "sep3x3": 9 * C + C * C + 2 * C,
    "sep3x3_d3": 9 * C + C * C + 2 * C,
    "sep5x5_d6": 25 * C + C * C + 2 * C,
    "skip": 0,
    "dcn3x3": _DCN + 2 * C,
}
OPS = ("conv3x3", "conv1x1", "sep3x3", "skip", "sep3x3_d3", "dcn3x3")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def levels(channels: int = C, batch: int = 2, seed: int = 0, sizes=LEVEL_SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def copies(layer: int, share_from: tuple[int, ...]) -> int:
    """Hand formula: one copy per level that owns the layer, plus one shared copy if any level shares it."""
    own = sum(1 for s in share_from if layer < s)
    return own + (1 if own < len(share_from) else 0)


@pytest.mark.parametrize("share_from", [(0,) * 5, (6,) * 5, (0, 2, 4, 6, 1), (3,) * 5, (1, 1, 0, 0, 5)])
def test_sequential_head_parameter_count_matches_hand_formula(share_from: tuple[int, ...]) -> None:
    head = SequentialHeadModule(SequentialHead(OPS, share_from), C)
    expected = sum(OP_PARAMS[op] * copies(i, share_from) for i, op in enumerate(OPS))
    assert n_params(head) == expected
    total = sum(OP_PARAMS[op] for op in OPS)
    if share_from == (0,) * 5:
        assert expected == total
    if share_from == (6,) * 5:
        assert expected == 5 * total


def test_shared_layers_are_the_same_parameters_and_own_layers_are_not() -> None:
    share_from = (0, 2, 4, 6, 1)
    head = SequentialHeadModule(SequentialHead(OPS, share_from), C)
    for i, layer in enumerate(head.layers):
        if OPS[i] == "skip":
            continue
        for a in range(5):
            for b in range(a + 1, 5):
                pa = list(layer.for_level(a).parameters())
                pb = list(layer.for_level(b).parameters())
                both_shared = share_from[a] <= i and share_from[b] <= i
                assert all((x is y) == both_shared for x, y in zip(pa, pb))
        assert (layer.shared is not None) == any(s <= i for s in share_from)
        assert set(layer.own) == {str(level) for level, s in enumerate(share_from) if i < s}


def test_level_specific_weights_only_affect_their_level() -> None:
    torch.manual_seed(0)
    head = SequentialHeadModule(SequentialHead(("conv3x3", "conv3x3"), (1, 0, 0, 0, 2)), C)
    feats = levels(sizes=[(6, 5)] * 5)  # maps big enough for GN not to erase a weight change
    base = head(feats)
    with torch.no_grad():
        weight = head.layers[0].for_level(0).conv.weight
        weight.add_(torch.randn_like(weight))
    after = head(feats)
    assert [not torch.allclose(a, b) for a, b in zip(base, after)] == [True, False, False, False, False]
    with torch.no_grad():
        weight = head.layers[0].shared.conv.weight
        weight.add_(torch.randn_like(weight))
    again = head(feats)
    assert [not torch.allclose(a, b) for a, b in zip(after, again)] == [False, True, True, True, False]


def test_sequential_head_applies_ops_in_order() -> None:
    torch.manual_seed(0)
    head = SequentialHeadModule(SequentialHead(("sep3x3", "skip", "conv1x1"), (0,) * 5), C)
    feats = levels()
    out = head(feats)
    for level, x in enumerate(feats):
        expected = head.layers[2].shared(head.layers[0].shared(x))
        assert torch.allclose(out[level], expected) and out[level].shape == x.shape


def test_sequential_head_rejects_bad_share_from() -> None:
    with pytest.raises(UserError, match="share"):
        SequentialHeadModule(SequentialHead(("conv3x3",) * 2, (0, 0, 3, 0, 0)), C)
    with pytest.raises(UserError, match="share_from"):
        SequentialHeadModule(SequentialHead(("conv3x3",) * 2, (0, 0, 0)), C)


# Paper-style cell head. Pool: 0 p, 1 o0, cell1 -> 2 o, 3 o, 4 a; cell2 -> 5 o, 6 o, 7 a.
CELL_HEAD = CellHead(
    "sep3x3",
    (HeadCell(1, 0, "skip", "sep3x3_d3", "sum"), HeadCell(4, 2, "dcn3x3", "sep5x5_d6", "concat")),
    (0, 0, 0, 0, 0),
)


def test_cell_head_computes_the_documented_pool() -> None:
    torch.manual_seed(0)
    head = CellHeadModule(CELL_HEAD, C)
    assert head.output_index == 7
    feats = levels()
    out = head(feats)
    op0 = head.layers["0"].shared
    c1 = head.layers["1"].shared
    c2 = head.layers["2"].shared
    for level, p in enumerate(feats):
        o0 = op0(p)
        a1 = c1.agg(c1.op1(o0), c1.op2(p))
        a2 = c2.agg(c2.op1(a1), c2.op2(c1.op1(o0)))
        assert torch.allclose(out[level], a2, atol=1e-6)
        assert out[level].shape == p.shape
    agg_norms = [m for m in c2.agg.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(agg_norms) == 1 and isinstance(agg_norms[0], nn.GroupNorm)


def test_cell_head_parameter_count_with_sharing() -> None:
    share_from = (0, 1, 3, 2, 0)  # layers: 0 = op0, 1 = cell 1, 2 = cell 2
    head = CellHeadModule(CellHead(CELL_HEAD.op0, CELL_HEAD.cells, share_from), C)
    grouped_concat = 2 * C + 2 * (2 * C)
    layer_params = [
        OP_PARAMS["sep3x3"],
        OP_PARAMS["skip"] + OP_PARAMS["sep3x3_d3"] + 2 * C,  # sum: per-channel a and b
        OP_PARAMS["dcn3x3"] + OP_PARAMS["sep5x5_d6"] + grouped_concat,
    ]
    assert n_params(head) == sum(n * copies(i, share_from) for i, n in enumerate(layer_params))


def test_cell_head_builds_only_what_the_output_needs() -> None:
    # Cell 2 reads cell 1's first op output (index 2) and p; cell 1's second op, its aggregation and op0 are dead.
    head_genotype = CellHead(
        "dcn3x3",
        (HeadCell(0, 0, "sep3x3", "sep3x3_d3", "sum"), HeadCell(2, 0, "skip", "sep3x3", "concat")),
        (0, 0, 0, 0, 0),
    )
    head = CellHeadModule(head_genotype, C)
    assert "0" not in head.layers
    cell1 = head.layers["1"].shared
    assert cell1.op1 is not None and cell1.op2 is None and cell1.agg is None
    out = head(levels())
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_fcos_head_init_and_outputs() -> None:
    torch.manual_seed(0)
    head = FCOSHead(SequentialHead(("conv3x3",) * 4, (0,) * 5), 64, num_classes=7)
    pred = head.predictor
    assert torch.allclose(pred.cls_logits.bias, torch.full((7,), -math.log(99.0)))
    assert torch.count_nonzero(pred.bbox_pred.bias) == 0 and torch.count_nonzero(pred.centerness.bias) == 0
    assert abs(pred.cls_logits.weight.std().item() - 0.01) < 0.002
    for tower in (head.cls_tower, head.bbox_tower):
        for layer in tower.layers:
            conv = layer.shared.conv
            assert abs(conv.weight.std().item() - 0.01) < 0.001 and torch.count_nonzero(conv.bias) == 0
    assert [s.scale.item() for s in pred.scales] == [1.0] * 5
    assert n_params(head.cls_tower) == n_params(head.bbox_tower)
    assert all(a is not b for a, b in zip(head.cls_tower.parameters(), head.bbox_tower.parameters()))

    cls, box, ctr = head(levels(64))
    for l, (h, w) in enumerate(LEVEL_SIZES):
        assert cls[l].shape == (2, 7, h, w) and box[l].shape == (2, 4, h, w) and ctr[l].shape == (2, 1, h, w)
        assert (box[l] > 0).all()
    # Foreground probability starts at the prior.
    assert abs(torch.sigmoid(cls[0]).mean().item() - 0.01) < 0.002


def test_vanilla_box_is_exp_and_centerness_on_cls_tower() -> None:
    torch.manual_seed(0)
    head = FCOSHead(SequentialHead(("conv3x3", "conv1x1"), (0,) * 5), C, num_classes=3, fcos="vanilla")
    feats = levels()
    with torch.no_grad():
        head.predictor.scales[1].scale.fill_(0.0)
    cls, box, ctr = head(feats)
    assert torch.equal(box[1], torch.ones_like(box[1]))
    reg = head.bbox_tower(feats)
    expected = torch.exp(head.predictor.scales[2](head.predictor.bbox_pred(reg[2])))
    assert torch.allclose(box[2], expected)
    with torch.no_grad():
        weight = head.bbox_tower.layers[0].shared.conv.weight
        weight.add_(torch.randn_like(weight))
    _, box2, ctr2 = head(feats)
    assert all(torch.equal(a, b) for a, b in zip(ctr, ctr2))
    assert not torch.allclose(box[0], box2[0])


def test_improved_box_is_relu_times_stride_and_centerness_on_reg_tower() -> None:
    torch.manual_seed(0)
    strides = (8, 16, 32, 64, 128)
    head = FCOSHead(
        SequentialHead(("conv3x3", "conv1x1"), (0,) * 5), C, num_classes=3, fcos="improved", strides=strides
    )
    feats = levels()
    cls, box, ctr = head(feats)
    reg = head.bbox_tower(feats)
    pred = head.predictor
    for l, s in enumerate(strides):
        assert torch.allclose(box[l], torch.relu(pred.scales[l](pred.bbox_pred(reg[l]))) * s)
        assert (box[l] >= 0).all()
        assert torch.allclose(ctr[l], pred.centerness(reg[l]))
    with torch.no_grad():
        weight = head.cls_tower.layers[0].shared.conv.weight
        weight.add_(torch.randn_like(weight))
    _, _, ctr2 = head(feats)
    assert all(torch.equal(a, b) for a, b in zip(ctr, ctr2))


def test_fcos_head_with_cell_head_and_bad_mode() -> None:
    torch.manual_seed(0)
    head = FCOSHead(CELL_HEAD, C, num_classes=2)
    cls, box, ctr = head(levels())
    assert [tuple(c.shape[-2:]) for c in cls] == LEVEL_SIZES
    assert all(torch.isfinite(b).all() for b in box)
    with pytest.raises(UserError, match="vanilla, improved"):
        FCOSHead(CELL_HEAD, C, num_classes=2, fcos="v2")
