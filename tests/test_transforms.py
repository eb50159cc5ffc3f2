"""Transforms move boxes exactly as hand-computed; batching pads to multiples of 32; dataset/loader contracts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nasfcos.data.coco import read_coco
from nasfcos.data.loader import DetectionDataset, build_loader, collate, set_epoch
from nasfcos.data.transforms import (
    CAFFE_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomSquareCrop,
    ResizeShortSide,
    ToTensor,
    boxes_to_original,
    build_transforms,
    crop,
    hflip,
    init_target,
    pad_batch,
)
from nasfcos.errors import UserError


def target(boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels if labels is not None else list(range(len(boxes))), dtype=torch.int64)}


def test_flip_moves_boxes_and_pixels() -> None:
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 255  # the box [10, 20, 30, 40]
    out, t = hflip(image, target([[10, 20, 30, 40]]))
    assert t["boxes"].tolist() == [[70, 20, 90, 40]]
    assert out[0, 30, 70:90].eq(255).all() and out[0, 30, 69] == 0 and out[0, 30, 90] == 0
    pil_out, t2 = hflip(Image.new("RGB", (100, 50)), target([[10, 20, 30, 40]]))
    assert t2["boxes"].tolist() == [[70, 20, 90, 40]] and pil_out.size == (100, 50)
    # p=1 always flips, p=0 never.
    assert RandomHorizontalFlip(1.0)(image, target([[0, 0, 10, 10]]))[1]["boxes"].tolist() == [[90, 0, 100, 10]]
    assert RandomHorizontalFlip(0.0)(image, target([[0, 0, 10, 10]]))[1]["boxes"].tolist() == [[0, 0, 10, 10]]


def test_resize_short_side_scales_boxes_per_axis() -> None:
    image = Image.new("RGB", (200, 100))  # w=200, h=100
    out, t = ResizeShortSide(50, 1333)(image, target([[10, 20, 30, 40]]))
    assert out.size == (100, 50) and t["size"] == (50, 100) and t["orig_size"] == (100, 200)
    assert t["boxes"].tolist() == [[5, 10, 15, 20]] and t["scale"] == (0.5, 0.5)
    # The long side cap wins: 100x400 with short 100 would be 400 long > 200 -> scale 0.5.
    out, t = ResizeShortSide(100, 200)(torch.zeros(3, 100, 400, dtype=torch.uint8), target([[40, 10, 80, 30]]))
    assert tuple(out.shape) == (3, 50, 200) and t["boxes"].tolist() == [[20, 5, 40, 15]]
    # Rounding makes the two axes differ: 333x500 -> 100x150 (150.15 rounded); boxes scale by 150/500, 100/333.
    out, t = ResizeShortSide(100, None)(Image.new("RGB", (500, 333)), target([[100, 33.3, 500, 333]]))
    assert out.size == (150, 100)
    sx, sy = t["scale"]
    assert sx == pytest.approx(0.3) and sy == pytest.approx(100 / 333)
    assert t["boxes"][0].tolist() == pytest.approx([30, 10, 150, 100], abs=1e-4)


def test_multiscale_choice_follows_the_generator() -> None:
    resize = ResizeShortSide((64, 80, 96, 112, 128), None)
    image = Image.new("RGB", (32, 32))
    sizes = lambda seed: [resize(image, target([]), torch.Generator().manual_seed(seed + i))[1]["size"][0]  # noqa
                          for i in range(20)]
    assert sizes(0) == sizes(0)
    assert set(sizes(0)) <= {64, 80, 96, 112, 128} and len(set(sizes(0))) > 1


def test_crop_clips_shifts_and_drops_boxes_by_visible_area() -> None:
    image = torch.arange(300, dtype=torch.float32).repeat(3, 100, 1)  # pixel value = x
    boxes = [[150, 10, 170, 90],   # inside the crop -> shifted by 100
             [50, 10, 150, 90],    # half visible -> clipped to [0, 10, 50, 90]
             [0, 0, 120, 50],      # 20/120 visible < 25 % -> dropped
             [250, 0, 260, 10]]    # outside -> dropped
    out, t = crop(image, target(boxes), top=0, left=100, height=100, width=100)
    assert out[0, 0, 0] == 100 and tuple(out.shape) == (3, 100, 100)
    assert t["boxes"].tolist() == [[50, 10, 70, 90], [0, 10, 50, 90]] and t["labels"].tolist() == [0, 1]
    assert t["size"] == (100, 100)


def test_random_square_crop_is_the_paper_proxy_input_and_is_seeded() -> None:
    image = Image.new("RGB", (600, 200))  # short side 200 -> resized to 384 x 1152, then a 384 square
    crop_ = RandomSquareCrop(384)
    out1, t1 = crop_(image, target([[0, 0, 600, 200], [10, 10, 20, 20]]), torch.Generator().manual_seed(5))
    out2, t2 = crop_(image, target([[0, 0, 600, 200], [10, 10, 20, 20]]), torch.Generator().manual_seed(5))
    assert out1.size == (384, 384) and t1["size"] == (384, 384)
    assert torch.equal(t1["boxes"], t2["boxes"]) and t1["affine"] == t2["affine"]
    ax, bx, ay, by = t1["affine"]
    assert ax == pytest.approx(384 / 200) and ay == pytest.approx(384 / 200) and by == 0
    left = -bx
    assert 0 <= left <= 1152 - 384 and float(left).is_integer()
    # The full-image box becomes the whole crop.
    assert t1["boxes"][0].tolist() == pytest.approx([0, 0, 384, 384])


def test_boxes_map_back_to_the_original_through_resize_crop_and_flip() -> None:
    boxes = [[40, 30, 120, 90], [10, 5, 30, 25], [150, 10, 190, 60]]
    pipeline = Compose([ResizeShortSide(150, None), RandomSquareCrop(150, resize=False, min_visible=0.0),
                        RandomHorizontalFlip(1.0)])
    image = Image.new("RGB", (200, 100))  # -> 300 x 150, then a 150 x 150 crop at x = L, then a flip
    for seed in range(5):
        out, t = pipeline(image, target(boxes), torch.Generator().manual_seed(seed))
        assert out.size == (150, 150)
        ax, bx, ay, by = t["affine"]
        assert (ax, ay, by) == (-1.5, 1.5, 0.0)  # x_cur = 150 - (1.5 x - L)
        left = bx - 150
        lo, hi = left / 1.5, (left + 150) / 1.5  # the crop in original pixels
        expected = [[max(x1, lo), y1, min(x2, hi), y2] for x1, y1, x2, y2 in boxes
                    if 1.5 * (min(x2, hi) - max(x1, lo)) >= 1]
        np.testing.assert_allclose(boxes_to_original(t["boxes"], t).numpy(), np.array(expected).reshape(-1, 4),
                                   atol=1e-4)
    # Without a crop the map is the exact inverse.
    _, t = Compose([ResizeShortSide(50, None), RandomHorizontalFlip(1.0)])(image, target(boxes))
    np.testing.assert_allclose(boxes_to_original(t["boxes"], t).numpy(), np.array(boxes), atol=1e-4)


def test_to_tensor_and_normalize() -> None:
    image = Image.new("RGB", (4, 2), (255, 0, 51))
    x, _ = ToTensor()(image, target([]))
    assert x.dtype == torch.float32 and x.shape == (3, 2, 4)
    assert x[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    y, _ = Normalize()(x, {})
    expected = [(v - m) / s for v, m, s in zip([1.0, 0.0, 0.2], IMAGENET_MEAN, IMAGENET_STD)]
    assert y[:, 1, 3].tolist() == pytest.approx(expected)
    z, _ = Normalize.caffe()(x, {})  # BGR, 0..255, minus the caffe mean
    assert z[:, 0, 0].tolist() == pytest.approx([51 - CAFFE_MEAN[0], 0 - CAFFE_MEAN[1], 255 - CAFFE_MEAN[2]], abs=1e-3)


def test_pad_batch_pads_to_multiples_of_32() -> None:
    a, b = torch.ones(3, 50, 70), torch.full((3, 64, 33), 2.0)
    batch, sizes = pad_batch([a, b])
    assert tuple(batch.shape) == (2, 3, 64, 96) and sizes == [(50, 70), (64, 33)]
    assert batch[0, :, :50, :70].eq(1).all() and batch[0, :, 50:].eq(0).all() and batch[0, :, :, 70:].eq(0).all()
    assert batch[1, :, :, :33].eq(2).all() and batch[1, :, :, 33:].eq(0).all()
    batch, _ = pad_batch([torch.ones(3, 65, 1)], size_divisible=32)
    assert tuple(batch.shape[-2:]) == (96, 32)


# ---------------------------------------------------------------------------------------------------------------
# Dataset, collate, loader
# ---------------------------------------------------------------------------------------------------------------


def tiny_set(root: Path, n: int = 5) -> Path:
    images, annotations = [], []
    for i in range(1, n + 1):
        w, h = 40 + 8 * i, 30
        Image.new("RGB", (w, h), (i * 20, 0, 0)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": 2 * i, "image_id": i, "category_id": 5, "bbox": [1, 2, 10, 10], "iscrowd": 0})
        annotations.append({"id": 2 * i + 1, "image_id": i, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    categories = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_dataset_item_and_collate(tmp_path: Path) -> None:
    ds = read_coco(tiny_set(tmp_path))
    data = DetectionDataset(ds, build_transforms(False, short=60, max_size=None))
    image, t = data[0]
    assert tuple(image.shape) == (3, 60, 96) and image.dtype == torch.float32
    assert t["labels"].tolist() == [0]  # the crowd box is left out of training targets
    assert t["boxes"].tolist() == [[2, 4, 22, 24]] and t["boxes"].dtype == torch.float32
    assert t["image_id"] == 1 and t["orig_size"] == (30, 48) and t["size"] == (60, 96) and t["scale"] == (2.0, 2.0)
    with_crowd = DetectionDataset(ds, include_crowd=True)[0][1]
    assert with_crowd["labels"].tolist() == [0, 1] and with_crowd["iscrowd"].tolist() == [False, True]
    batch, targets = collate([data[0], data[3]])
    assert tuple(batch.shape) == (2, 3, 64, 160) and [t["size"] for t in targets] == [(60, 96), (60, 144)]


def test_dataset_names_corrupt_or_resized_images(tmp_path: Path) -> None:
    ds = read_coco(tiny_set(tmp_path))
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (10, 10)).save(tmp_path / "3.png")
    (tmp_path / "4.png").unlink()
    data = DetectionDataset(ds)
    with pytest.raises(UserError, match="2.png: cannot decode image"):
        data[1]
    with pytest.raises(UserError, match="3.png: size: 10x10: differs from the annotated 64x30"):
        data[2]
    with pytest.raises(UserError, match="4.png: image file not found"):
        data[3]


def test_seeded_augmentation_is_reproducible_per_item_and_epoch(tmp_path: Path) -> None:
    ds = read_coco(tiny_set(tmp_path, 1))
    transforms = Compose([ResizeShortSide(tuple(range(20, 80)), None), ToTensor()])
    data = DetectionDataset(ds, transforms, seed=7)
    sizes = []
    for epoch in range(6):
        data.set_epoch(epoch)
        first, again = data[0][1]["size"], data[0][1]["size"]
        assert first == again
        sizes.append(first)
    assert len(set(sizes)) > 1


def test_build_loader_order_is_seeded_and_batches_collate(tmp_path: Path) -> None:
    ds = read_coco(tiny_set(tmp_path, 6))
    data = DetectionDataset(ds, build_transforms(False, short=30, max_size=None))

    def order(seed: int, epoch: int) -> list[int]:
        loader = build_loader(data, batch_size=2, shuffle=True, seed=seed)
        set_epoch(loader, epoch)
        ids = []
        for images, targets in loader:
            assert images.shape[0] == len(targets) and images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
            ids += [t["image_id"] for t in targets]
        return ids

    assert sorted(order(0, 0)) == [1, 2, 3, 4, 5, 6]
    assert order(0, 0) == order(0, 0) and order(0, 1) == order(0, 1)
    assert len({tuple(order(0, e)) for e in range(4)}) > 1
    plain = build_loader(data, batch_size=4, shuffle=False, seed=0)
    assert [t["image_id"] for _, ts in plain for t in ts] == [1, 2, 3, 4, 5, 6]


def test_build_loader_shards_when_distributed(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    ds = read_coco(tiny_set(tmp_path, 4))
    data = DetectionDataset(ds)
    with pytest.raises(RuntimeError):
        build_loader(data, 2, True, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(data, 2, True, seed=1, distributed=None)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 1
        assert sorted(t["image_id"] for _, ts in loader for t in ts) == [1, 2, 3, 4]
    finally:
        dist.destroy_process_group()


def test_init_target_handles_empty_boxes() -> None:
    t = init_target(torch.zeros(3, 5, 7), {})
    assert t["boxes"].shape == (0, 4) and t["size"] == (5, 7)
    out, t = RandomSquareCrop(4, resize=False)(torch.zeros(3, 5, 7), t, torch.Generator().manual_seed(0))
    assert tuple(out.shape) == (3, 4, 4) and t["boxes"].shape == (0, 4)
    assert np.isfinite(t["affine"]).all()
