"""FCOS points and target assignment against hand-derived answers.

Geometry used throughout: a 128 x 128 input, so P3..P7 maps are 16, 8, 4, 2, 1 cells wide; P3 points sit at
8k + 4 and P4 points at 16k + 8. Every expected positive set below was worked out by hand from the rules in
FACTS 4 (strictly inside; lo <= max(l, t, r, b) <= hi; smallest area wins).
"""

from __future__ import annotations

import math

import pytest
import torch

from nasfcos.detection.points import flatten_levels, level_points
from nasfcos.detection.targets import (
    DEFAULT_RANGES,
    FCOSTargets,
    assign_targets,
    assign_targets_batch,
    default_ranges,
    make_level_ranges,
)

STRIDES = (8, 16, 32, 64, 128)
SIZES = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # 128 x 128 input


def _setup():
    per_level = level_points(SIZES, STRIDES)
    ranges, strides = make_level_ranges(per_level, STRIDES)
    return torch.cat(per_level), ranges, strides


def _index(level: int, x: int, y: int) -> int:
    """Index of the point at input pixel (x, y) on pyramid level ``level`` (0 = P3) in the concatenation."""
    stride = STRIDES[level]
    offset = sum(h * w for h, w in SIZES[:level])
    width = SIZES[level][1]
    assert x % stride == stride // 2 and y % stride == stride // 2, "not a point of that level"
    return offset + (y // stride) * width + (x // stride)


def _assign(boxes, labels=None, **opts) -> FCOSTargets:
    points, ranges, strides = _setup()
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if labels is None:
        labels = list(range(boxes.shape[0]))
    labels = torch.tensor(labels, dtype=torch.int64)
    return assign_targets(points, boxes, labels, level_ranges=ranges, strides=strides, **opts)


def _positive_set(targets: FCOSTargets, level: int) -> set[tuple[int, int]]:
    points, _, _ = _setup()
    offset = sum(h * w for h, w in SIZES[:level])
    count = SIZES[level][0] * SIZES[level][1]
    found = set()
    for i in range(offset, offset + count):
        if targets.labels[i] >= 0:
            found.add((int(points[i, 0]), int(points[i, 1])))
    return found


# --- points -------------------------------------------------------------------------------------------------


def test_level_points_hand_values_and_row_major_order():
    p3, p4 = level_points([(2, 3), (1, 2)], (8, 16))
    assert p3.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert p4.tolist() == [[8, 8], [24, 8]]
    assert p3.dtype == torch.float32


def test_flatten_levels_matches_point_order():
    a = torch.arange(12.0).reshape(1, 2, 2, 3)  # N=1, C=2, H=2, W=3
    b = torch.tensor([[[[100.0]], [[200.0]]]])  # N=1, C=2, 1 x 1
    flat = flatten_levels([a, b])
    assert flat.shape == (1, 7, 2)
    # cell (y=0, x=1) is a[0, :, 0, 1] = (1, 7); cell (y=1, x=0) is (3, 9)
    assert flat[0, 1].tolist() == [1.0, 7.0]
    assert flat[0, 3].tolist() == [3.0, 9.0]
    assert flat[0, 6].tolist() == [100.0, 200.0]


def test_default_ranges_and_per_point_ranges():
    inf = math.inf
    assert DEFAULT_RANGES == ((-1, 64), (64, 128), (128, 256), (256, 512), (512, inf))
    assert default_ranges(3) == ((-1, 64), (64, 128), (128, inf))
    ranges, strides = make_level_ranges([2, 3], (8, 16), ((-1, 64), (64, inf)))
    assert strides.tolist() == [8, 8, 16, 16, 16]
    assert ranges.tolist() == [[-1, 64], [-1, 64], [64, inf], [64, inf], [64, inf]]


# --- (a) a box straddling the P3 and P4 ranges ----------------------------------------------------------------


def test_box_straddling_p3_and_p4():
    t = _assign([[0, 0, 100, 100]], [3])
    # P3 points 8k+4 inside (0, 100): the max distance max(x, 100-x, y, 100-y) <= 64 only for x, y in 36..64.
    near = (36, 44, 52, 60)
    assert _positive_set(t, 0) == {(x, y) for x in near for y in near}
    # P4 points 16k+8: max(x, 100-x) is 92, 76, 60, 56, 72, 88 for x = 8, 24, 40, 56, 72, 88; a point is
    # positive on P4 when its max is >= 64, i.e. unless both coordinates are in {40, 56}.
    p4 = (8, 24, 40, 56, 72, 88)
    assert _positive_set(t, 1) == {(x, y) for x in p4 for y in p4} - {(x, y) for x in (40, 56) for y in (40, 56)}
    # P5 and above: max distance < 128 everywhere.
    for level in (2, 3, 4):
        assert _positive_set(t, level) == set()
    # specific points: P3 (52, 52) in range (max 52); P3 (4, 4) not (max 96); P4 (8, 8) yes (max 92)
    assert t.labels[_index(0, 52, 52)] == 3
    assert t.labels[_index(0, 4, 4)] == -1
    assert t.labels[_index(1, 8, 8)] == 3
    assert t.labels[_index(1, 56, 56)] == -1
    assert t.reg[_index(1, 8, 8)].tolist() == [8, 8, 92, 92]
    assert t.boxes[_index(1, 8, 8)].tolist() == [0, 0, 100, 100]


def test_range_boundary_64_is_inclusive_on_both_levels():
    # Box (0, 0, 68, 72). P3 point (4, 12): l=4, t=12, r=64, b=60 -> max exactly 64 -> in (-1, 64].
    # P4 point (8, 8): l=8, t=8, r=60, b=64 -> max exactly 64 -> in [64, 128].
    t = _assign([[0, 0, 68, 72]])
    assert t.labels[_index(0, 4, 12)] == 0
    assert t.reg[_index(0, 4, 12)].tolist() == [4, 12, 64, 60]
    assert t.labels[_index(1, 8, 8)] == 0
    # P3 point (4, 4): b = 68 > 64 -> out of the P3 range; P4 point (24, 24): max 48 < 64 -> out of P4's.
    assert t.labels[_index(0, 4, 4)] == -1
    assert t.labels[_index(1, 24, 24)] == -1


# --- (b) overlapping boxes: smallest area wins -----------------------------------------------------------------


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_point_in_two_boxes_takes_smaller_area(order):
    big, small = [0, 0, 60, 60], [20, 20, 50, 50]
    boxes = [[big, small][i] for i in order]
    labels = [[7, 2][i] for i in order]
    t = _assign(boxes, labels)
    small_index = order.index(1)
    i = _index(0, 36, 36)  # inside both, in P3 range for both (max 36 / 16)
    assert t.labels[i] == 2
    assert t.matched[i] == small_index
    assert t.boxes[i].tolist() == small
    assert t.reg[i].tolist() == [16, 16, 14, 14]
    j = _index(0, 12, 12)  # only inside the big box (max 48)
    assert t.labels[j] == 7
    assert t.matched[j] == 1 - small_index


def test_equal_areas_tie_goes_to_first_box():
    t = _assign([[0, 0, 40, 40], [10, 10, 50, 50]], [4, 5])
    i = _index(0, 28, 28)  # inside both, both 40 x 40
    assert t.matched[i] == 0 and t.labels[i] == 4


# --- (c) strictly inside ---------------------------------------------------------------------------------------


def test_point_on_box_edge_is_not_positive():
    t = _assign([[4, 0, 40, 40]])
    assert t.labels[_index(0, 4, 12)] == -1  # on the left edge: l = 0
    assert t.labels[_index(0, 12, 12)] == 0  # l = 8
    t = _assign([[0, 0, 12, 40]])
    assert t.labels[_index(0, 12, 12)] == -1  # on the right edge: r = 0
    assert t.labels[_index(0, 4, 12)] == 0


# --- (d) center sampling ---------------------------------------------------------------------------------------


def test_center_sampling_on_vs_off():
    box = [[0, 0, 100, 100]]
    off = _assign(box)
    on = _assign(box, center_sampling_radius=1.5)
    assert len(_positive_set(off, 0)) == 16
    # P3: region = centre (50, 50) +- 1.5 * 8 = (38, 38, 62, 62) -> P3 points 44, 52, 60 (36 is outside).
    assert _positive_set(on, 0) == {(x, y) for x in (44, 52, 60) for y in (44, 52, 60)}
    # P4: region (26, 26, 74, 74) -> P4 points 40, 56, 72; in the P4 range only if a coordinate is 72.
    assert _positive_set(on, 1) == {(40, 72), (56, 72), (72, 40), (72, 56), (72, 72)}


def test_center_sampling_region_is_clipped_to_the_box():
    # 10 x 10 box, smaller than the P3 region (+-12): the clipped region is the box itself.
    small = [[40, 40, 50, 50]]
    assert _positive_set(_assign(small, center_sampling_radius=1.5), 0) == {(44, 44)}
    assert _positive_set(_assign(small), 0) == {(44, 44)}
    # 20 x 100 box: x region clipped to the box (0..20), y region 38..62 -> x in {4, 12}, y in {44, 52, 60}.
    tall = [[0, 0, 20, 100]]
    on = _assign(tall, center_sampling_radius=1.5)
    assert _positive_set(on, 0) == {(x, y) for x in (4, 12) for y in (44, 52, 60)}
    # without center sampling: y in 36..64 has max(y, 100 - y) <= 64 -> y in {36, 44, 52, 60}
    assert _positive_set(_assign(tall), 0) == {(x, y) for x in (4, 12) for y in (36, 44, 52, 60)}


# --- (e) no boxes ----------------------------------------------------------------------------------------------


def test_image_without_boxes_is_all_background():
    points, ranges, strides = _setup()
    for boxes in (torch.zeros((0, 4)), torch.zeros(0)):
        t = assign_targets(points, boxes, torch.zeros(0, dtype=torch.int64), level_ranges=ranges, strides=strides)
        num_points = points.shape[0]
        assert t.labels.shape == (num_points,) and t.labels.dtype == torch.int64
        assert (t.labels == -1).all() and (t.matched == -1).all()
        assert t.boxes.shape == (num_points, 4) and (t.boxes == 0).all()
        assert t.reg.shape == (num_points, 4) and (t.reg == 0).all()
        assert (t.centerness == 0).all()


# --- (f) centerness and normalisation --------------------------------------------------------------------------


def test_centerness_hand_values_and_background_zero():
    t = _assign([[0, 0, 100, 100]])
    # (36, 36): l = t = 36, r = b = 64 -> sqrt((36/64) * (36/64)) = 0.5625
    assert t.centerness[_index(0, 36, 36)].item() == pytest.approx(0.5625)
    # (44, 52): l=44, r=56, t=52, b=48
    assert t.centerness[_index(0, 44, 52)].item() == pytest.approx(math.sqrt((44 / 56) * (48 / 52)), rel=1e-6)
    assert t.centerness[_index(0, 4, 4)].item() == 0.0
    assert (t.reg[t.labels < 0] == 0).all() and (t.boxes[t.labels < 0] == 0).all()


def test_normalize_by_stride_divides_regression_targets():
    plain = _assign([[0, 0, 100, 100]])
    scaled = _assign([[0, 0, 100, 100]], normalize_by_stride=True)
    i = _index(1, 8, 8)  # stride 16: (8, 8, 92, 92) / 16
    assert scaled.reg[i].tolist() == [0.5, 0.5, 5.75, 5.75]
    j = _index(0, 52, 44)  # stride 8: (52, 44, 48, 56) / 8
    assert scaled.reg[j].tolist() == [6.5, 5.5, 6.0, 7.0]
    assert torch.equal(scaled.centerness, plain.centerness)
    assert torch.equal(scaled.labels, plain.labels)


# --- batch wrapper ---------------------------------------------------------------------------------------------


def test_batch_wrapper_stacks_images():
    per_level = level_points(SIZES, STRIDES)
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([5])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    batch = assign_targets_batch(per_level, targets, STRIDES, center_sampling_radius=1.5)
    num_points = sum(h * w for h, w in SIZES)
    assert batch.labels.shape == (2, num_points)
    assert batch.reg.shape == (2, num_points, 4)
    assert batch.centerness.shape == (2, num_points)
    # 9 P3 + 5 P4 positives (test_center_sampling_on_vs_off), all labelled 5; none in the empty image
    assert int((batch.labels[0] == 5).sum()) == 14 and int((batch.labels[0] >= 0).sum()) == 14
    assert (batch.labels[1] == -1).all()
    assert batch.positive.sum() == 14
