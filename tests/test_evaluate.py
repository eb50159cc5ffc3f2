"""COCO evaluation: hand-reasoned AP values, pycocotools called directly, category mapping, files."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from nasfcos.errors import UserError
from nasfcos.data.coco_eval import (
    STAT_NAMES,
    coco_evaluate,
    detections_to_coco,
    evaluate_detections,
    load_detections,
    save_detections,
    save_metrics,
)


def make_gt(boxes_per_image: dict[int, list[tuple[list[float], int]]], categories=(1,)) -> dict:
    """A COCO GT dict: image id -> [(xywh, category_id)], with area/iscrowd/id filled like real COCO files."""
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in boxes_per_image]
    annotations = []
    for image_id, items in boxes_per_image.items():
        for bbox, cat in items:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {"info": {}, "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}


def pycocotools_stats(gt: dict, dets: list[dict]) -> list[float]:
    """Reference: pycocotools' own loading path (COCO + loadRes), independent of our wrapper."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def det(image_id: int, bbox: list[float], score: float, cat: int = 1) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


# Hand-made case: image 1 has A (large, 100x100) and B (medium, 50x50); image 2 has C (medium, 40x40).
# d1 = A exactly (IoU 1, score .9); d2 = B shifted 12 px (IoU 38/62 = 0.613, score .8);
# d3 = a false positive (score .7); d4 = C shifted 4 px (IoU 36/44 = 0.818, score .6).
HAND_GT = make_gt({1: [([0, 0, 100, 100], 1), ([200, 200, 50, 50], 1)], 2: [([0, 0, 40, 40], 1)]})
HAND_DETS = [
    det(1, [0, 0, 100, 100], 0.9),
    det(1, [212, 200, 50, 50], 0.8),
    det(2, [300, 300, 20, 20], 0.7),
    det(2, [4, 0, 40, 40], 0.6),
]


def test_hand_case_matches_hand_reasoned_values():
    m = coco_evaluate(HAND_GT, HAND_DETS)
    # 101-point interpolated AP per IoU threshold (ranked: d1, d2, d3, d4; 3 GT):
    #  t in .50-.60: TP TP FP TP -> precision 1 up to recall 2/3 (67 points), 3/4 up to 1 (34 points)
    #  t in .65-.80: TP FP FP TP -> 1 up to recall 1/3 (34 points), 1/2 up to 2/3 (33 points), then 0
    #  t in .85-.95: TP FP FP FP -> 1 up to recall 1/3 (34 points)
    ap_low, ap_mid, ap_high = 92.5 / 101, 50.5 / 101, 34 / 101
    assert m["AP50"] == pytest.approx(ap_low, abs=1e-9)
    assert m["AP75"] == pytest.approx(ap_mid, abs=1e-9)
    assert m["AP"] == pytest.approx((3 * ap_low + 4 * ap_mid + 3 * ap_high) / 10, abs=1e-9)
    # Large: only A, found exactly. Medium: B and C (d1 matches a large GT, d3 is small: both ignored):
    #  t <= .60: TP TP -> 1; .65-.80: FP TP -> 1/2 up to recall 1/2 (51 points); >= .85: nothing found.
    assert m["APl"] == pytest.approx(1.0, abs=1e-9)
    assert m["APm"] == pytest.approx((3 * 1.0 + 4 * 25.5 / 101) / 10, abs=1e-9)
    assert m["APs"] == -1.0  # no small ground truth
    # Recall at 100 detections, averaged over thresholds: 3/3 (x3), 2/3 (x4), 1/3 (x3).
    assert m["AR100"] == pytest.approx((3 * 1 + 4 * 2 / 3 + 3 * 1 / 3) / 10, abs=1e-9)
    # One detection per image: d1 (finds A) and d3 (the false positive outranks d4) -> recall 1/3 everywhere.
    assert m["AR1"] == pytest.approx(1 / 3, abs=1e-9)


def test_hand_case_agrees_with_pycocotools_directly():
    ours = coco_evaluate(HAND_GT, HAND_DETS)
    reference = pycocotools_stats(HAND_GT, HAND_DETS)
    assert list(ours) == list(STAT_NAMES)
    for name, value in zip(STAT_NAMES, reference):
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_one_of_two_missed_caps_recall_at_half():
    gt = make_gt({1: [([10, 10, 100, 100], 1), ([300, 300, 100, 100], 1)]})
    m = coco_evaluate(gt, [det(1, [10, 10, 100, 100], 0.5)])
    assert m["AR100"] == pytest.approx(0.5, abs=1e-9)
    assert m["AP"] == pytest.approx(51 / 101, abs=1e-9)  # precision 1 for recall thresholds 0..0.50


def test_perfect_detections_give_ap_one():
    gt = make_gt({1: [([10, 10, 100, 80], 1), ([300, 200, 120, 150], 2)], 2: [([50, 60, 110, 100], 2)]},
                 categories=(1, 2))
    dets = [det(a["image_id"], a["bbox"], 0.9, a["category_id"]) for a in gt["annotations"]]
    m = coco_evaluate(gt, dets)
    for name in ("AP", "AP50", "AP75", "APl", "AR100"):
        assert m[name] == pytest.approx(1.0, abs=1e-6), name


def test_empty_detections_score_zero():
    m = coco_evaluate(HAND_GT, [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
    assert pycocotools_stats(HAND_GT, [det(1, [500, 400, 5, 5], 0.1)])[0] == 0.0  # same as a useless detection


def test_category_mapping_and_wrong_category():
    # Non-contiguous dataset ids: contiguous label 0 -> category 3, label 1 -> category 7.
    gt = make_gt({5: [([10, 10, 100, 100], 3)], 9: [([20, 20, 120, 90], 7)]}, categories=(3, 7))
    outputs = [
        {"boxes": torch.tensor([[10.0, 10.0, 110.0, 110.0]]), "scores": torch.tensor([0.9]),
         "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[20.0, 20.0, 140.0, 110.0]]), "scores": torch.tensor([0.8]),
         "labels": torch.tensor([1])},
    ]
    dets = detections_to_coco(outputs, image_ids=[5, 9], category_ids=[3, 7])
    assert dets == [
        {"image_id": 5, "category_id": 3, "bbox": [10.0, 10.0, 100.0, 100.0], "score": pytest.approx(0.9)},
        {"image_id": 9, "category_id": 7, "bbox": [20.0, 20.0, 120.0, 90.0], "score": pytest.approx(0.8)},
    ]
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0, abs=1e-6)
    swapped = detections_to_coco(outputs, image_ids=[5, 9], category_ids=[7, 3])
    result = evaluate_detections(gt, swapped)
    assert result.metrics["AP"] == 0.0
    assert result.per_category_ap == {3: 0.0, 7: 0.0}


def test_per_category_ap_and_summary_text():
    gt = make_gt({1: [([0, 0, 100, 100], 1), ([200, 200, 100, 100], 2)]}, categories=(1, 2, 4))
    result = evaluate_detections(gt, [det(1, [0, 0, 100, 100], 0.9, 1)])
    assert result.per_category_ap[1] == pytest.approx(1.0, abs=1e-6)
    assert result.per_category_ap[2] == 0.0
    assert result.per_category_ap[4] == -1.0  # no ground truth of category 4
    assert "Average Precision" in result.summary


def test_gt_without_area_iscrowd_or_ids_is_completed():
    gt = make_gt({1: [([0, 0, 100, 100], 1)], 2: [([0, 0, 50, 50], 1)]})
    for ann in gt["annotations"]:
        del ann["area"], ann["iscrowd"], ann["id"]
    m = coco_evaluate(gt, [det(1, [0, 0, 100, 100], 0.9), det(2, [0, 0, 50, 50], 0.8)])
    assert m["AP"] == pytest.approx(1.0, abs=1e-6)
    assert m["APm"] == pytest.approx(1.0, abs=1e-6)  # area filled in as w*h = 2500 -> medium


def test_subset_of_images():
    m = coco_evaluate(HAND_GT, HAND_DETS, image_ids=[1])
    assert m["AP50"] == pytest.approx(1.0, abs=1e-6)  # image 1 alone: d1, d2 both correct at IoU 0.5


def test_files_round_trip(tmp_path):
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(HAND_GT))
    results = save_detections(tmp_path / "results.json", HAND_DETS)
    assert load_detections(results) == HAND_DETS
    from_files = coco_evaluate(gt_path, results)
    assert from_files == coco_evaluate(HAND_GT, HAND_DETS)
    metrics_path = save_metrics(tmp_path / "metrics.json", {**from_files, "step": 10})
    assert json.loads(metrics_path.read_text())["AP50"] == from_files["AP50"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="image_id 42"):
        coco_evaluate(HAND_GT, [det(42, [0, 0, 1, 1], 0.5)])
    with pytest.raises(UserError, match="category_id 9"):
        coco_evaluate(HAND_GT, [det(1, [0, 0, 1, 1], 0.5, cat=9)])
    with pytest.raises(UserError, match="missing.json"):
        coco_evaluate(tmp_path / "missing.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(UserError, match="annotations"):
        coco_evaluate(bad, [])
    not_list = tmp_path / "results.json"
    not_list.write_text('{"a": 1}')
    with pytest.raises(UserError, match="list of detections"):
        load_detections(not_list)


def test_detections_to_coco_rejects_bad_labels():
    out = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([2])}]
    with pytest.raises(ValueError, match="label 2"):
        detections_to_coco(out, [1], [1, 2])
    with pytest.raises(ValueError, match="outputs"):
        detections_to_coco(out, [1, 2], [1, 2, 3])
