"""FCOS post-processing: logits built so that exactly known boxes and scores must come out.

Two levels: a 4 x 4 stride-8 map (points 8k + 4) and a 2 x 2 stride-16 map (points 16k + 8), K = 3 classes,
a 32 x 32 padded input holding an image of h = 30, w = 31. Background logits are -10 (probability 4.5e-5).
Planted (point, class, cls prob, centerness prob, l t r b) and the box and score they must give:

    A  P3 (12, 12) class 0  p 0.8  c 0.9   (4, 4, 8, 8)   -> (8, 8, 20, 20)    score 0.72
    B  P3 (20, 12) class 0  p 0.6  c 0.5   (11, 4, 0, 8)  -> (9, 8, 20, 20)    score 0.30  IoU(A) 0.917: suppressed
    C  P3 (28, 12) class 1  p 0.7  c 0.5   (20, 4, -8, 8) -> (8, 8, 20, 20)    score 0.35  other class: kept
    D  P3 (4, 28)  class 2  p 0.04 c ~1    (1, 1, 1, 1)   -> below 0.05 on the class probability: dropped
    E  P3 (28, 28) class 2  p 0.5  c ~1    (4, 4, 10, 10) -> (24, 24, 38, 38) clipped to (24, 24, 31, 30)  ~0.5
    F  P4 (24, 8)  class 1  p 0.9  c 0.5   (8, 8, 8, 8)   -> (16, 0, 32, 16) clipped to (16, 0, 31, 16)  0.45
    G  P3 (4, 4)   class 1  p 0.1  c 0.1   (2, 2, 2, 2)   -> (2, 2, 6, 6)      score 0.01 (kept: threshold is on p)

(C's negative r only makes the box coincide with A's; the decoder never outputs one, the math does not care.)
"""

from __future__ import annotations

import math

import pytest
import torch

from nasfcos.detection.points import level_points
from nasfcos.detection.postprocess import postprocess

K = 3
SIZES = [(4, 4), (2, 2)]
STRIDES = (8, 16)
BIG = 20.0  # sigmoid(20) = 1 - 2e-9


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


PLANTED = [
    # name, level, x, y, class, p, centerness prob (or None = ~1), ltrb
    ("A", 0, 12, 12, 0, 0.8, 0.9, (4, 4, 8, 8)),
    ("B", 0, 20, 12, 0, 0.6, 0.5, (11, 4, 0, 8)),
    ("C", 0, 28, 12, 1, 0.7, 0.5, (20, 4, -8, 8)),
    ("D", 0, 4, 28, 2, 0.04, None, (1, 1, 1, 1)),
    ("E", 0, 28, 28, 2, 0.5, None, (4, 4, 10, 10)),
    ("F", 1, 24, 8, 1, 0.9, 0.5, (8, 8, 8, 8)),
    ("G", 0, 4, 4, 1, 0.1, 0.1, (2, 2, 2, 2)),
]

EXPECTED = {  # name -> (box, score, label)
    "A": ([8, 8, 20, 20], 0.72, 0),
    "E": ([24, 24, 31, 30], 0.5, 2),
    "F": ([16, 0, 31, 16], 0.45, 1),
    "C": ([8, 8, 20, 20], 0.35, 1),
    "G": ([2, 2, 6, 6], 0.01, 1),
}


def _outputs(num_images: int = 1):
    cls = [torch.full((num_images, K, h, w), -10.0) for h, w in SIZES]
    reg = [torch.ones((num_images, 4, h, w)) for h, w in SIZES]
    ctr = [torch.zeros((num_images, 1, h, w)) for h, w in SIZES]
    for _, level, x, y, label, p, c, ltrb in PLANTED:
        stride = STRIDES[level]
        gx, gy = x // stride, y // stride
        cls[level][0, label, gy, gx] = _logit(p)
        ctr[level][0, 0, gy, gx] = BIG if c is None else _logit(c)
        reg[level][0, :, gy, gx] = torch.tensor(ltrb, dtype=torch.float32)
    return cls, reg, ctr, level_points(SIZES, STRIDES)


def _check(result, names, score_fn=lambda s: s):
    assert result["boxes"].shape == (len(names), 4)
    assert result["labels"].dtype == torch.int64
    for i, name in enumerate(names):
        box, score, label = EXPECTED[name]
        assert result["boxes"][i].tolist() == pytest.approx(box, abs=1e-4), name
        assert result["scores"][i].item() == pytest.approx(score_fn(score), abs=1e-5), name
        assert result["labels"][i].item() == label, name


def test_known_answer_threshold_nms_and_clipping():
    cls, reg, ctr, points = _outputs()
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)])
    _check(result, ["A", "E", "F", "C", "G"])


def test_sqrt_score_mode():
    cls, reg, ctr, points = _outputs()
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)], sqrt_score=True)
    _check(result, ["A", "E", "F", "C", "G"], score_fn=math.sqrt)


def test_pre_nms_top_n_is_per_level_and_ranks_by_final_score():
    cls, reg, ctr, points = _outputs()
    # P3 candidates by final score: A .72, E .5, C .35, B .3, G .01 -> top 2 are A, E (by class probability
    # alone it would be A, C). P4 keeps its single candidate F.
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)], pre_nms_top_n=2)
    _check(result, ["A", "E", "F"])


def test_detections_per_image_cap_and_score_threshold():
    cls, reg, ctr, points = _outputs()
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)], detections_per_img=2)
    _check(result, ["A", "E"])
    # raising the threshold above G's probability 0.1 (and B's 0.6 is irrelevant: suppressed anyway)
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)], score_thresh=0.55)
    _check(result, ["A", "F", "C"])


def test_nms_keeps_same_class_boxes_below_the_iou_threshold():
    cls, reg, ctr, points = _outputs()
    # move B to (9, 8, 20, 14): IoU with A = 66 / 144 = 0.458 < 0.6 -> B survives with score 0.30
    reg[0][0, :, 1, 2] = torch.tensor([11.0, 4.0, 0.0, 2.0])
    (result,) = postprocess(cls, reg, ctr, points, [(30, 31)])
    assert result["scores"].tolist() == pytest.approx([0.72, 0.5, 0.45, 0.35, 0.30, 0.01], abs=1e-5)
    assert result["boxes"][4].tolist() == pytest.approx([9, 8, 20, 14])


def test_batch_with_an_empty_image():
    cls, reg, ctr, points = _outputs(num_images=2)
    first, second = postprocess(cls, reg, ctr, points, [(30, 31), (32, 32)])
    _check(first, ["A", "E", "F", "C", "G"])
    assert second["boxes"].shape == (0, 4) and second["scores"].shape == (0,) and second["labels"].shape == (0,)


def test_rescale_to_original_size_and_clip():
    cls, reg, ctr, points = _outputs()
    # the 30 x 31 input was resized by 2 from the original: boxes are halved and clipped to the original size
    (explicit,) = postprocess(cls, reg, ctr, points, [(30, 31)], scale_factors=[(2.0, 2.0)], original_sizes=[(15, 15)])
    halved = {"A": [4, 4, 10, 10], "E": [12, 12, 15, 15], "F": [8, 0, 15, 8], "C": [4, 4, 10, 10], "G": [1, 1, 3, 3]}
    for i, name in enumerate(["A", "E", "F", "C", "G"]):
        assert explicit["boxes"][i].tolist() == pytest.approx(halved[name]), name
    # default original size: round(30 / 2) = 15 high, round(31 / 2) = 16 wide -> E keeps x1 = 15.5
    (default,) = postprocess(cls, reg, ctr, points, [(30, 31)], scale_factors=[(2.0, 2.0)])
    assert default["boxes"][1].tolist() == pytest.approx([12, 12, 15.5, 15])
    # anisotropic factors: sx = 2, sy = 0.5 -> A (8, 8, 20, 20) becomes (4, 16, 10, 40)
    (aniso,) = postprocess(cls, reg, ctr, points, [(30, 31)], scale_factors=[(2.0, 0.5)], original_sizes=[(60, 16)])
    assert aniso["boxes"][0].tolist() == pytest.approx([4, 16, 10, 40])


def test_random_inputs_respect_caps():
    gen = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (4, 4)]
    cls = [torch.randn(2, 5, h, w, generator=gen) + 1 for h, w in sizes]
    reg = [torch.rand(2, 4, h, w, generator=gen) * 20 for h, w in sizes]
    ctr = [torch.randn(2, 1, h, w, generator=gen) for h, w in sizes]
    points = level_points(sizes, (8, 16))
    results = postprocess(cls, reg, ctr, points, [(64, 64), (50, 40)], pre_nms_top_n=7, detections_per_img=9)
    for result, (h, w) in zip(results, [(64, 64), (50, 40)]):
        assert 0 < result["boxes"].shape[0] <= 9
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    # no NMS suppression possible at IoU threshold 1 -> exactly min(7 + 7, 100) boxes per image
    results = postprocess(cls, reg, ctr, points, [(64, 64), (64, 64)], pre_nms_top_n=7, nms_thresh=1.0)
    assert [r["boxes"].shape[0] for r in results] == [14, 14]
