"""The synthetic shapes set: determinism, annotation validity, size distribution, reuse, command line."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nasfcos.cli import main
from nasfcos.data.check import check_dataset
from nasfcos.data.synthetic import (
    SHAPES,
    ensure_synthetic,
    make_synthetic,
    read_synthetic,
    render_image,
    resolve_params,
)
from nasfcos.errors import UserError

SMALL = dict(num_train=10, num_val=4)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("synth")
    make_synthetic(base / "a", seed=0, **SMALL)
    make_synthetic(base / "b", seed=0, **SMALL)
    make_synthetic(base / "c", seed=1, **SMALL)
    return base / "a", base / "b", base / "c"


def test_same_seed_gives_identical_files_and_different_seed_differs(generated: tuple[Path, Path, Path]) -> None:
    a, b, c = generated
    for split in ("train", "val"):
        assert (a / "annotations" / f"{split}.json").read_bytes() == (b / "annotations" / f"{split}.json").read_bytes()
        assert (a / "annotations" / f"{split}.json").read_bytes() != (c / "annotations" / f"{split}.json").read_bytes()
    for name in ("000001.png", "000010.png"):
        pa = np.asarray(Image.open(a / "images" / "train" / name))
        assert np.array_equal(pa, np.asarray(Image.open(b / "images" / "train" / name)))
        assert not np.array_equal(pa, np.asarray(Image.open(c / "images" / "train" / name)))


def test_image_depends_only_on_seed_split_and_index() -> None:
    small, large = resolve_params(num_train=2), resolve_params(num_train=50)
    p1, a1 = render_image(small, "train", 1)
    p2, a2 = render_image(large, "train", 1)
    assert np.array_equal(p1, p2) and a1 == a2
    assert not np.array_equal(render_image(small, "val", 1)[0], p1)


def test_annotations_are_valid_coco_inside_images_and_non_degenerate(generated: tuple[Path, Path, Path]) -> None:
    from pycocotools.coco import COCO

    root = generated[0]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "train.json"))
    assert len(coco.getImgIds()) == 10
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 10
    for a in anns:
        x, y, w, h = a["bbox"]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256
        assert a["visible_fraction"] >= 0.3 - 1e-9  # at most 70 % occluded
    info = json.loads((root / "annotations" / "train.json").read_text())["info"]
    assert info["params"]["seed"] == 0 and info["params"]["image_size"] == [256, 256]
    # The checker (which also decodes every image and compares sizes) finds nothing wrong.
    assert check_dataset(root).ok
    ds = read_synthetic(ensure_synthetic(root, seed=0, **SMALL), "val")
    assert len(ds) == 4 and ds.records[0].path == root / "images" / "val" / "000001.png"


def test_boxes_are_the_tight_extent_of_the_drawn_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a black background (no clutter, no noise) the only non-zero pixels are the object's: its box must be
    exactly their extent (x2, y2 exclusive)."""
    import nasfcos.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_background", lambda rng, h, w, clutter: np.full((h, w, 3), -1e3, np.float32))
    params = resolve_params(objects_per_image=(1, 1), clutter=False, noise=0.0)
    checked = 0
    for index in range(8):
        pixels, anns = render_image(params, "train", index)
        assert len(anns) == 1  # a single object is never occluded
        ys, xs = np.nonzero(pixels.max(-1) > 0)
        assert anns[0]["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        checked += 1
    assert checked == 8


def test_sizes_are_log_uniform_and_cover_every_level_range() -> None:
    """Longer box sides span 8..200 px at 256 px; FCOS's level ranges scaled to 256 px (0-20-41-82-164) all get
    objects whose centre regression distance (half the longer side) or edge distance (the side) falls in them."""
    params = resolve_params(clutter=False, noise=0.0, max_occlusion=0.999)
    sides = []
    for index in range(80):
        for a in render_image(params, "train", index)[1]:
            x1, y1, x2, y2 = a["box"]
            sides.append(max(x2 - x1, y2 - y1))
    sides = np.array(sides)
    assert sides.min() < 12 and sides.max() > 170
    assert (sides < 64).any() and (sides > 128).any()
    # Log-uniform: each of the four equal log-width bins between 8 and 200 holds a fair share (expected 25 %).
    edges = np.exp(np.linspace(math.log(8), math.log(200), 5))
    counts, _ = np.histogram(np.clip(sides, 8, 200), edges)
    assert (counts / counts.sum() > 0.15).all(), counts
    scaled = np.array([0, 64, 128, 256, 512]) * 256 / 800
    for lo, hi in zip(scaled[:-1], scaled[1:]):  # P3..P6 at the native resolution
        assert ((sides / 2 > lo) & (sides / 2 <= hi) | (sides > lo) & (sides <= hi)).any()


def test_every_class_appears_and_occlusion_drops_objects() -> None:
    params = resolve_params(clutter=False, noise=0.0)
    labels, dropped = [], 0
    loose = resolve_params(clutter=False, noise=0.0, max_occlusion=0.999)
    for index in range(24):
        anns = render_image(params, "train", index)[1]
        labels += [a["label"] for a in anns]
        dropped += len(render_image(loose, "train", index)[1]) - len(anns)
    assert set(labels) == set(range(len(SHAPES)))
    assert dropped > 0  # some objects are more than 70 % hidden by later ones


def test_ensure_reuses_identical_and_regenerates_changed(tmp_path: Path) -> None:
    first = ensure_synthetic(tmp_path, seed=3, num_train=3, num_val=2)
    assert not first.reused
    again = ensure_synthetic(tmp_path, seed=3, num_train=3, num_val=2)
    assert again.reused and again.num_train_objects == first.num_train_objects
    (tmp_path / "images" / "train" / "000002.png").unlink()  # damaged set -> regenerated
    assert not ensure_synthetic(tmp_path, seed=3, num_train=3, num_val=2).reused
    changed = ensure_synthetic(tmp_path, seed=3, num_train=2, num_val=2)
    assert not changed.reused and not (tmp_path / "images" / "train" / "000003.png").exists()
    with pytest.raises(UserError, match="num_classes"):
        make_synthetic(tmp_path, num_classes=9)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "64x96",
                 "--num-classes", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    data = json.loads((out / "annotations" / "train.json").read_text())
    assert data["images"][0]["height"] == 64 and data["images"][0]["width"] == 96 and len(data["categories"]) == 3
    assert main(["data", "synth", "--out", str(out), "--num-train", "2", "--num-val", "1", "--size", "64x96",
                 "--num-classes", "3"]) == 0
    assert "reused" in capsys.readouterr().out
