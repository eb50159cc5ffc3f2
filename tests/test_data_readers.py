"""COCO and VOC readers, DetectionSet (COCO export, subset, split) against hand-made files and pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nasfcos.data.coco import read_coco, write_coco
from nasfcos.data.records import DetectionSet, ImageRecord
from nasfcos.data.voc import VOC_CLASSES, read_voc
from nasfcos.errors import UserError


def _png(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 30, 60)).save(path)


def tiny_coco(root: Path) -> Path:
    """Two images; category ids deliberately unsorted and gapped (7, 3, 12)."""
    data = {
        "images": [
            {"id": 42, "file_name": "a.png", "width": 100, "height": 80},
            {"id": 7, "file_name": "b.png", "width": 50, "height": 60},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 900.0, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 12, "bbox": [0.5, 1.5, 2, 3], "area": 6.0, "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 7, "bbox": [5, 6, 10, 20], "area": 150.0, "iscrowd": 0},
        ],
    }
    path = root / "annotations" / "instances_mini.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    _png(root / "mini" / "a.png", 100, 80)
    _png(root / "mini" / "b.png", 50, 60)
    return path


def test_coco_reader_converts_boxes_maps_categories_and_keeps_crowd(tmp_path: Path) -> None:
    ds = read_coco(tiny_coco(tmp_path))
    assert ds.category_ids == [3, 7, 12]  # sorted ids -> labels 0, 1, 2
    assert ds.class_names == ["three", "seven", "twelve"]
    assert [r.image_id for r in ds.records] == [42, 7]
    a, b = ds.records
    np.testing.assert_array_equal(a.boxes, np.array([[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]], np.float32))
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [0, 2]
    assert a.iscrowd.tolist() == [False, True]
    assert b.labels.tolist() == [1] and b.boxes.tolist() == [[5, 6, 15, 26]]
    assert (a.width, a.height) == (100, 80)
    # Default image root follows the official layout: annotations/instances_<name>.json -> <name>/.
    assert a.path == (tmp_path / "mini" / "a.png").resolve()
    assert not a.boxes.flags.writeable  # records are read-only


def test_coco_image_root_explicit_and_absolute(tmp_path: Path) -> None:
    path = tiny_coco(tmp_path)
    ds = read_coco(path, image_root=tmp_path / "elsewhere")
    assert ds.records[0].path == tmp_path / "elsewhere" / "a.png"
    data = json.loads(path.read_text())
    data["images"][0]["file_name"] = str(tmp_path / "abs.png")
    path.write_text(json.dumps(data))
    assert read_coco(path).records[0].path == tmp_path / "abs.png"


def test_coco_export_roundtrip_and_pycocotools_evaluates_perfect_detections(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = read_coco(tiny_coco(tmp_path))
    out = write_coco(ds, tmp_path / "out.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out))
    anns = gt.loadAnns(gt.getAnnIds())
    assert min(a["id"] for a in anns) == 1  # COCOeval treats id 0 as "unmatched"
    by_bbox = {tuple(a["bbox"]): a for a in anns}
    assert by_bbox[(10.0, 20.0, 30.0, 40.0)]["category_id"] == 3
    assert by_bbox[(0.5, 1.5, 2.0, 3.0)]["iscrowd"] == 1
    assert by_bbox[(10.0, 20.0, 30.0, 40.0)]["area"] == 900.0  # source area kept

    again = read_coco(out, image_root=tmp_path / "mini")
    for r1, r2 in zip(ds.records, again.records):
        np.testing.assert_array_equal(r1.boxes, r2.boxes)
        np.testing.assert_array_equal(r1.labels, r2.labels)

    # Perfect detections of every non-crowd object give AP 1 through pycocotools.
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in anns if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)


def _record(i: int) -> ImageRecord:
    return ImageRecord(i, Path(f"{i}.png"), 10, 10, np.array([[0, 0, 5, 5]]), np.array([0]),
                       np.array([False]), np.array([False]))


def test_split_is_deterministic_disjoint_and_sized() -> None:
    ds = DetectionSet([_record(i) for i in range(1, 101)], ["x"], [1], "mem")
    a1, b1 = ds.split((60, 30), seed=3)
    a2, b2 = ds.split((60, 30), seed=3)
    a3, _ = ds.split((60, 30), seed=4)
    ids = lambda d: [r.image_id for r in d.records]  # noqa: E731
    assert ids(a1) == ids(a2) and ids(b1) == ids(b2)
    assert ids(a1) != ids(a3)
    assert len(a1) == 60 and len(b1) == 30 and not set(ids(a1)) & set(ids(b1))
    assert ids(a1) == sorted(ids(a1))  # original order kept inside a part
    f1, f2 = ds.split(0.8, seed=0)
    assert (len(f1), len(f2)) == (80, 20) and set(ids(f1)) | set(ids(f2)) == set(range(1, 101))
    with pytest.raises(UserError):
        ds.split((90, 20))
    sub = ds.subset([5, 2])
    assert ids(sub) == [6, 3] and sub.class_names == ["x"]


# ---------------------------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------------------------


def voc_xml(objects: list[tuple[str, tuple[int, int, int, int], int]], w: int = 100, h: int = 80,
            extra: str = "") -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return (f"{extra}<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def tiny_voc(root: Path, year: str = "2007", names: tuple[str, ...] = ("000005", "000007")) -> Path:
    base = root / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names) + "\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text(names[0] + "\n")
    contents = [voc_xml([("dog", (1, 1, 10, 20), 0), ("person", (5, 6, 100, 80), 1)]),
                voc_xml([("tvmonitor", (3, 4, 5, 6), 0)])]
    for name, content in zip(names, contents):
        (base / "Annotations" / f"{name}.xml").write_text(content)
    for n in names:
        Image.new("RGB", (100, 80)).save(base / "JPEGImages" / f"{n}.jpg")
    return base


def test_voc_reader_converts_one_based_pixels_and_keeps_difficult(tmp_path: Path) -> None:
    tiny_voc(tmp_path)
    ds = read_voc(tmp_path, "trainval")
    assert ds.class_names == list(VOC_CLASSES) and ds.category_ids == list(range(1, 21))
    assert [r.image_id for r in ds.records] == [1, 2]
    first = ds.records[0]
    # (xmin-1, ymin-1, xmax, ymax): a box over 1-based pixels 1..10 covers [0, 10).
    np.testing.assert_array_equal(first.boxes, np.array([[0, 0, 10, 20], [4, 5, 100, 80]], np.float32))
    assert first.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert first.difficult.tolist() == [False, True]
    assert first.path == tmp_path / "VOC2007" / "JPEGImages" / "000005.jpg"
    assert ds.records[1].labels.tolist() == [19]
    coco = ds.to_coco_dict()
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1, 0]  # difficult -> ignored by COCOeval
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 10.0, 20.0]


def test_voc_root_can_be_the_year_folder_and_years_select(tmp_path: Path) -> None:
    base = tiny_voc(tmp_path)
    tiny_voc(tmp_path, "2012", ("2008_000001",))
    assert len(read_voc(base, "test")) == 1
    assert len(read_voc(tmp_path, "trainval")) == 3  # both years
    only = read_voc(tmp_path, "trainval", years=["2012"])
    assert len(only) == 1 and only.records[0].path.name == "2008_000001.jpg"
    with pytest.raises(UserError, match="VOC2010"):
        read_voc(tmp_path, years=2010)


def test_voc_rejects_doctype_and_missing_split(tmp_path: Path) -> None:
    base = tiny_voc(tmp_path)
    bomb = '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
    (base / "Annotations" / "000007.xml").write_text(voc_xml([("dog", (1, 1, 5, 5), 0)], extra=bomb))
    with pytest.raises(UserError, match="000007.xml.*DOCTYPE"):
        read_voc(base, on_bad_box="error")
    with pytest.warns(UserWarning, match="unreadable annotation XML"):
        assert len(read_voc(base)) == 1
    with pytest.raises(UserError, match="val.txt"):
        read_voc(base, "val")
