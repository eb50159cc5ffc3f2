"""The feature cache: exact round trip of features, targets and ground truth; reuse, rebuild, corruption, CLI.

Truth comes from outside the cache code: crops are redone with the data layer's ``RandomSquareCrop`` from the
documented per-image seed, features from a fresh backbone loaded from the same weights file, targets from
``assign_targets_batch`` on points whose level sizes are read off a real decoder's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nasfcos.data.cache import FeatureCache, build_cache, crop_seed
from nasfcos.data.loader import load_image, record_target
from nasfcos.data.synthetic import make_synthetic, read_synthetic
from nasfcos.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomSquareCrop, ToTensor
from nasfcos.detection.points import level_points
from nasfcos.detection.targets import assign_targets_batch
from nasfcos.errors import UserError
from nasfcos.nn.backbones import build_backbone

CROP = 128
SEED = 3
BATCH = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """12 non-square synthetic images (so the random crop really moves) and a saved resnet18."""
    root = tmp_path_factory.mktemp("cache_data")
    info = make_synthetic(root / "synth", seed=1, num_train=12, num_val=6, image_size=(128, 176))
    dataset = read_synthetic(info, "train")
    torch.manual_seed(0)
    weights = root / "resnet18.pt"
    torch.save(build_backbone("resnet18", None, freeze_at=0, frozen_bn=False).state_dict(), weights)
    return root, dataset, weights


@pytest.fixture(scope="module")
def cache(data) -> FeatureCache:
    root, dataset, weights = data
    return build_cache(dataset, root / "cache", backbone="resnet18", weights=weights, crop=CROP, meta_train=8,
                       meta_val=4, seed=SEED, batch_size=BATCH, threads=1, progress=False)


def _independent_crop(record):
    image = load_image(record)
    target = record_target(record, include_crowd=True, include_difficult=True)
    generator = torch.Generator().manual_seed(crop_seed(SEED, record.image_id))
    image, target = RandomSquareCrop(CROP)(image, target, generator)
    image, target = ToTensor()(image, target)
    image, _ = Normalize(IMAGENET_MEAN, IMAGENET_STD)(image, target)
    return image, target


def test_split_is_the_datasets_deterministic_split(cache: FeatureCache, data) -> None:
    _, dataset, _ = data
    train, val = dataset.split((8, 4), seed=SEED)
    assert cache.train.image_ids.tolist() == [r.image_id for r in train.records]
    assert cache.val.image_ids.tolist() == [r.image_id for r in val.records]
    assert not set(cache.train.image_ids.tolist()) & set(cache.val.image_ids.tolist())
    assert len(cache.train) == 8 and len(cache.val) == 4
    manifest = cache.manifest
    assert manifest["num_classes"] == dataset.num_classes and manifest["class_names"] == dataset.class_names
    assert manifest["channels"] == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    assert manifest["weights"]["kind"] == "file" and len(manifest["weights"]["sha256"]) == 64


def test_features_round_trip_exactly(cache: FeatureCache, data) -> None:
    """Cached fp16 features of the first backbone batch equal a fresh forward pass over the same crops."""
    _, dataset, weights = data
    train, _ = dataset.split((8, 4), seed=SEED)
    records = train.records[:BATCH]
    crops = [_independent_crop(r) for r in records]
    backbone = build_backbone("resnet18", weights, freeze_at=5).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            fresh = backbone(torch.stack([image for image, _ in crops]))
    finally:
        torch.set_num_threads(threads)
    cached = cache.train.features(list(range(BATCH)), dtype=None)
    for level in ("c2", "c3", "c4", "c5"):
        assert cached[level].dtype == torch.float16
        assert torch.equal(cached[level], fresh[level].half()), level
    # Any order of indices gives the same rows (reads are sorted internally, results follow the request).
    shuffled = cache.train.features([3, 0, 2], dtype=None)["c3"]
    assert torch.equal(shuffled, cached["c3"][[3, 0, 2]])
    assert cache.train.features([1])["c5"].dtype == torch.float32


def test_targets_and_ground_truth_round_trip_exactly(cache: FeatureCache, data) -> None:
    from nasfcos.nn.decoder import Decoder
    from nasfcos.space.presets import PRESETS

    _, dataset, _ = data
    _, val = dataset.split((8, 4), seed=SEED)
    # Level sizes as a real decoder produces them on the cached features (not as the cache computes them).
    decoder = Decoder(PRESETS["fpn-fcos"].genotype, cache.channels, cache.num_classes, 8, 8).eval()
    with torch.no_grad():
        outputs = decoder(cache.val.features([0]))
    sizes = [tuple(level.shape[-2:]) for level in outputs.cls_logits]
    points = level_points(sizes, (8, 16, 32, 64, 128))
    assert sum(p.shape[0] for p in points) == cache.manifest["num_points"]

    indices = [2, 0, 3]
    crops = [_independent_crop(val.records[i]) for i in indices]
    expected = assign_targets_batch(points, [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in crops])
    got = cache.val.targets(indices)
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.reg, expected.reg)
    assert torch.equal(got.centerness, expected.centerness)
    assert torch.equal(got.matched, expected.matched)  # no crowd objects here: both index the same list
    assert torch.equal(got.boxes, expected.boxes)
    assert int((got.labels >= 0).sum()) > 0
    for item, (_, target) in zip(cache.val.gt(indices), crops):
        assert torch.equal(item["boxes"], target["boxes"])
        assert torch.equal(item["labels"], target["labels"])
        assert not item["ignore"].any()
    assert sum(len(g["boxes"]) for g in cache.val.gt(range(4))) == cache.manifest["splits"]["val"]["num_objects"]


def test_boxes_are_scaled_clipped_and_mostly_hidden_ones_dropped(cache: FeatureCache) -> None:
    for split in (cache.train, cache.val):
        for item in split.gt(range(len(split))):
            boxes = item["boxes"]
            assert (boxes >= 0).all() and (boxes <= CROP).all()
            assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
    # The crop window moved inside the 128 x 176 images for some image (x offset != 0).
    offsets = np.asarray(cache.train.array("affine"))[:, 1]
    assert (offsets != 0).any()


def _small(data, **kwargs):
    root, dataset, weights = data
    subset = dataset.subset(range(6))
    options = dict(backbone="resnet18", weights=weights, crop=64, meta_train=4, meta_val=2, seed=0, batch_size=6,
                   threads=1, progress=False)
    options.update(kwargs)
    return subset, options


def test_same_inputs_reuse_and_other_inputs_rebuild(data, tmp_path: Path) -> None:
    subset, options = _small(data)
    out = tmp_path / "cache"
    first = build_cache(subset, out, **options)
    assert not first.reused
    stamps = {p.name: p.stat().st_mtime_ns for p in [out / "manifest.json", out / "train" / "c3.npy"]}
    again = build_cache(subset, out, **options)
    assert again.reused
    assert {p.name: p.stat().st_mtime_ns for p in [out / "manifest.json", out / "train" / "c3.npy"]} == stamps

    with pytest.raises(UserError, match="other inputs"):
        build_cache(subset, out, **{**options, "seed": 1, "overwrite": False})
    rebuilt = build_cache(subset, out, **{**options, "seed": 1})
    assert not rebuilt.reused and rebuilt.manifest["seed"] == 1
    assert (out / "manifest.json").stat().st_mtime_ns != stamps["manifest.json"]
    assert not list(out.glob(".building-*"))  # the staging folder is gone


def test_missing_corrupt_or_truncated_cache_is_a_user_error(data, tmp_path: Path) -> None:
    subset, options = _small(data)
    out = tmp_path / "cache"
    build_cache(subset, out, **options)
    with pytest.raises(UserError, match="not found"):
        FeatureCache.open(tmp_path / "nothing")

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json: missing"):
        FeatureCache.open(broken)

    (broken / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="malformed JSON"):
        FeatureCache.open(broken)

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    del manifest["feature_shapes"]
    (broken / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(UserError, match="corrupt manifest"):
        FeatureCache.open(broken)

    shutil.copy(out / "manifest.json", broken / "manifest.json")
    c3 = broken / "train" / "c3.npy"
    os.truncate(c3, c3.stat().st_size // 2)
    with pytest.raises(UserError, match="c3.npy"):
        FeatureCache.open(broken)
    # A broken cache is never reused: building again repairs it.
    repaired = build_cache(subset, broken, **options)
    assert not repaired.reused
    assert torch.equal(repaired.train.features([0], dtype=None)["c3"],
                       FeatureCache.open(out).train.features([0], dtype=None)["c3"])


def test_detector_weights_give_the_backbone_of_the_detector(data, tmp_path: Path) -> None:
    root, _, weights = data
    state = torch.load(weights, weights_only=True)
    detector = {"model": {**{f"backbone.{k}": v for k, v in state.items()},
                          "decoder.head.weight": torch.zeros(3)},
                "meta": {"backbone": "resnet18"}}
    detector_file = tmp_path / "model_final.pt"
    torch.save(detector, detector_file)
    subset, options = _small(data)
    from_file = build_cache(subset, tmp_path / "a", **options)
    options.pop("weights")
    from_detector = build_cache(subset, tmp_path / "b", detector_weights=detector_file, **options)
    assert from_detector.manifest["weights"]["kind"] == "detector"
    for level in ("c2", "c5"):
        assert torch.equal(from_file.val.features([0, 1], dtype=None)[level],
                           from_detector.val.features([0, 1], dtype=None)[level])
    with pytest.raises(UserError, match="resnet50"):
        build_cache(subset, tmp_path / "c", detector_weights=detector_file, **{**options, "backbone": "resnet50"})
    with pytest.raises(UserError, match="at most one"):
        build_cache(subset, tmp_path / "d", detector_weights=detector_file, weights=weights, **options)


def test_split_sizes_as_fractions_and_bad_sizes(data, tmp_path: Path) -> None:
    subset, options = _small(data, meta_train=0.5, meta_val=None, crop=32)
    cache = build_cache(subset, tmp_path / "f", **options)
    assert (len(cache.train), len(cache.val)) == (3, 3)
    assert cache.cache_nbytes > sum(np.asarray(cache.train.array(k)).nbytes for k in ("c2", "c3", "c4", "c5"))
    with pytest.raises(UserError, match="do not fit"):
        build_cache(subset, tmp_path / "g", **{**options, "meta_train": 5, "meta_val": 3})
    with pytest.raises(UserError, match="fraction"):
        build_cache(subset, tmp_path / "g", **{**options, "meta_train": 1.5})


def test_cache_command_builds_then_reuses(data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nasfcos.cli import main

    root, _, weights = data
    args = ["cache", "--data", str(root / "synth"), "--backbone", "resnet18", "--weights", str(weights),
            "--crop", "32", "--meta-train", "8", "--meta-val", "4", "--out", str(tmp_path / "c"), "--threads", "1",
            "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "feature cache built" in out and "meta-train: 8 images" in out and "meta-val: 4 images" in out
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert main(args[:-1] + ["--seed", "5", "--no-overwrite", "--quiet"]) == 2
    assert "other inputs" in capsys.readouterr().err
