"""nn/decoder.py: every preset and 200 sampled genotypes build and run; adapter; sizes; channels_last."""

from __future__ import annotations

import math
import random

import pytest
import torch

from nasfcos.errors import UserError
from nasfcos.nn.decoder import Decoder, HeadOutputs
from nasfcos.nn.fpn import PlainFPN, SearchedFPN
from nasfcos.space.genotype import FPNCell, Genotype, SequentialHead
from nasfcos import PRESETS
from nasfcos.space.search_space import SearchSpace

IN_CHANNELS = {"c2": 8, "c3": 16, "c4": 24, "c5": 32}
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def features(height: int, width: int, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, math.ceil(height / STRIDES[k]), math.ceil(width / STRIDES[k]), generator=g)
        for k, c in IN_CHANNELS.items()
    }


def expected_sizes(feats: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    h, w = feats["c5"].shape[-2:]
    h6, w6 = (h + 1) // 2, (w + 1) // 2
    return [tuple(feats[k].shape[-2:]) for k in ("c3", "c4", "c5")] + [(h6, w6), ((h6 + 1) // 2, (w6 + 1) // 2)]


def check_outputs(out: HeadOutputs, feats: dict[str, torch.Tensor], batch: int = 1) -> None:
    assert isinstance(out, HeadOutputs)
    sizes = expected_sizes(feats)
    for name, channels in (("cls_logits", NUM_CLASSES), ("bbox_reg", 4), ("centerness", 1)):
        maps = getattr(out, name)
        assert len(maps) == 5, name
        for level, (m, size) in enumerate(zip(maps, sizes)):
            assert m.shape == (batch, channels, *size), (name, level)
            assert torch.isfinite(m).all(), (name, level)
    assert all((b > 0).all() for b in out.bbox_reg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs(name: str) -> None:
    torch.manual_seed(0)
    preset = PRESETS[name]
    decoder = Decoder(preset.genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16, concat=preset.concat)
    assert isinstance(decoder.fpn, SearchedFPN if preset.genotype.searched_fpn else PlainFPN)
    feats = features(128, 96, batch=2)
    check_outputs(decoder(feats), feats, batch=2)


def test_sampled_genotypes_from_both_head_spaces_run() -> None:
    rng = random.Random(0)
    feats = features(128, 128)
    spaces = [SearchSpace(head="sequential"), SearchSpace(head="cell")]
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(200):
            space = spaces[i % 2]
            genotype = space.sample(rng)
            decoder = Decoder(genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16)
            decoder.train(i % 4 < 2)  # both BN modes
            check_outputs(decoder(feats), feats)


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (100, 76)])
def test_any_input_size_and_width_adapter(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    preset = PRESETS["nas-fcos"]
    decoder = Decoder(preset.genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=32)
    assert decoder.adapter is not None
    assert tuple(decoder.adapter.weight.shape) == (32, 16, 1, 1)
    assert decoder.head.predictor.cls_logits.in_channels == 32
    feats = features(*size)
    check_outputs(decoder(feats), feats)
    same = Decoder(preset.genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16)
    assert same.adapter is None


def test_improved_mode_and_dense_concat() -> None:
    torch.manual_seed(0)
    genotype = PRESETS["nas-fcos"].genotype
    grouped = Decoder(genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16)
    dense = Decoder(genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16, concat="dense", fcos="improved")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Seven concat cells in the released FPN; each dense 1x1 has C*2C weights instead of 2C.
    assert n(dense) - n(grouped) == 7 * (16 * 32 - 32)
    feats = features(128, 128)
    out = dense(feats)
    assert all((b >= 0).all() for b in out.bbox_reg)
    assert [tuple(c.shape) for c in out.centerness] == [(1, 1, *s) for s in expected_sizes(feats)]


def test_channels_last_inputs_and_model() -> None:
    torch.manual_seed(0)
    decoder = Decoder(PRESETS["nas-fcos"].genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16).eval()
    feats = features(128, 96, batch=2)
    with torch.no_grad():
        expected = decoder(feats)
        cl_feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
        got = decoder(cl_feats)
        decoder = decoder.to(memory_format=torch.channels_last)
        got_cl_model = decoder(cl_feats)
    for out in (got, got_cl_model):
        for a_list, b_list in zip(expected, out):
            assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(a_list, b_list))


def test_invalid_genotype_and_arguments_raise_user_error() -> None:
    head = SequentialHead(("conv3x3",), (0,) * 5)
    too_few = Genotype(fpn=(FPNCell(3, 3, "skip", "skip", "sum"),), head=head)
    with pytest.raises(UserError, match="unconsumed"):
        Decoder(too_few, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16)
    with pytest.raises(UserError, match="fcos"):
        Decoder(PRESETS["fpn-fcos"].genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=16, head_width=16, fcos="v3")
    with pytest.raises(UserError, match="fpn_width"):
        Decoder(PRESETS["fpn-fcos"].genotype, IN_CHANNELS, NUM_CLASSES, fpn_width=15, head_width=16)
