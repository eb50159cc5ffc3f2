"""`nasfcos data check` and the readers' shared validation: one test per kind of problem, skip vs error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nasfcos.cli import main
from nasfcos.data.check import check_dataset
from nasfcos.data.coco import read_coco
from nasfcos.data.records import DataWarning, DetectionSet, ImageRecord
from nasfcos.data.voc import read_voc
from nasfcos.errors import UserError
from test_data_readers import tiny_voc, voc_xml  # shared hand-made VOCdevkit builder


def write_set(root: Path, annotations: list[dict[str, Any]] | None = None, images: list[dict[str, Any]] | None = None,
              categories: list[dict[str, Any]] | None = None, make_images: bool = True) -> Path:
    """A clean two-image COCO set (images 64x48) unless parts are replaced."""
    images = images if images is not None else [
        {"id": 1, "file_name": "1.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "2.png", "width": 64, "height": 48},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "iscrowd": 0},
    ]
    categories = categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    if make_images:
        for image in images:
            if isinstance(image, dict) and "file_name" in image:
                Image.new("RGB", (64, 48), (10, 200, 30)).save(root / image["file_name"])
    return path


def ann(i: int, bbox: Any, image_id: int = 1, category_id: int = 1) -> dict[str, Any]:
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


def kinds(report: Any) -> list[str]:
    return [p.kind for p in report.problems]


def test_clean_set_has_no_problems(tmp_path: Path) -> None:
    report = check_dataset(write_set(tmp_path))
    assert report.ok and report.summary["images"] == 2 and report.summary["objects"] == 2


def test_missing_image(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    (tmp_path / "2.png").unlink()
    report = check_dataset(path)
    assert kinds(report) == ["missing_image"]
    assert report.problems[0].file == str(tmp_path / "2.png") and report.problems[0].field == "images[1].file_name"


def test_corrupt_and_truncated_images(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    (tmp_path / "1.png").write_bytes(b"this is not a png at all")
    noisy = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "2.png")
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[: len(data) // 2])  # truncated: header fine, pixels missing
    report = check_dataset(path)
    assert kinds(report) == ["corrupt_image", "corrupt_image"]


def test_image_size_differs_from_annotation(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    Image.new("RGB", (48, 64)).save(tmp_path / "1.png")  # transposed
    report = check_dataset(path)
    assert kinds(report) == ["size_mismatch"] and report.problems[0].value == "48x64"


@pytest.mark.parametrize(
    ("bbox", "kind"),
    [
        ([100, 100, 10, 10], "outside_box"),    # entirely right/below of the 64x48 image
        ([-30, 0, 20, 10], "outside_box"),      # ends at x = -10
        ([50, 40, 30, 30], "clipped_box"),      # partly outside
        ([10, 10, 0, 5], "degenerate_box"),     # zero width
        ([10, 10, 5, -1], "degenerate_box"),    # negative height
        ([1, 2, 3], "malformed_box"),           # wrong length
        (["1", 2, 3, 4], "malformed_box"),      # non-numeric
        (None, "malformed_box"),
    ],
)
def test_box_problems(tmp_path: Path, bbox: Any, kind: str) -> None:
    path = write_set(tmp_path, [ann(1, [1, 1, 5, 5]), ann(2, bbox)])
    report = check_dataset(path, verify_images=False)
    assert kinds(report) == [kind]
    assert report.problems[0].field == "annotations[1].bbox"


def test_box_within_one_pixel_tolerance_is_clipped_silently(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [-0.4, 0, 64.5, 48.2])])
    assert check_dataset(path, verify_images=False).ok
    assert read_coco(path).records[0].boxes.tolist() == [[0, 0, 64, 48]]


def test_unknown_category_and_image_ids_and_duplicates(tmp_path: Path) -> None:
    annotations = [ann(1, [1, 1, 5, 5]), ann(2, [1, 1, 5, 5], category_id=99), ann(3, [1, 1, 5, 5], image_id=77),
                   ann(1, [2, 2, 5, 5], image_id=2)]
    images = [{"id": 1, "file_name": "1.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "2.png", "width": 64, "height": 48},
              {"id": 1, "file_name": "3.png", "width": 64, "height": 48}]
    report = check_dataset(write_set(tmp_path, annotations, images), verify_images=False)
    assert kinds(report) == ["duplicate_image_id", "unknown_category", "unknown_image", "duplicate_annotation_id"]
    fields = [p.field for p in report.problems]
    assert fields == ["images[2].id", "annotations[1].category_id", "annotations[2].image_id", "annotations[3].id"]


def test_malformed_image_entry(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "1.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "2.png", "width": "wide", "height": 48}]
    report = check_dataset(write_set(tmp_path, [ann(1, [1, 1, 5, 5])], images), verify_images=False)
    assert kinds(report) == ["malformed_image"] and report.problems[0].field == "images[1].width"


def test_malformed_json_and_missing_keys_are_one_line_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(UserError) as info:
        check_dataset(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match="categories: missing"):
        check_dataset(missing)
    with pytest.raises(UserError, match="categories"):
        read_coco(missing)


def test_reader_skip_drops_clips_and_warns_once_with_counts(tmp_path: Path) -> None:
    annotations = [ann(1, [1, 1, 5, 5]), ann(2, [50, 40, 30, 30]), ann(3, [10, 10, 0, 5]), ann(4, [100, 100, 5, 5]),
                   ann(5, [1, 1, 5, 5], category_id=42)]
    path = write_set(tmp_path, annotations)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read_coco(path, on_bad_box="skip")
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1
    text = str(data_warnings[0].message)
    for expected in ("1 boxes partly outside", "1 zero or negative size", "1 boxes entirely outside",
                     "1 annotations with an unknown category"):
        assert expected in text
    # Kept: the clean box and the clipped one (50,40)-(80,70) -> (50,40)-(64,48).
    assert ds.records[0].boxes.tolist() == [[1, 1, 6, 6], [50, 40, 64, 48]]


def test_reader_error_names_file_field_and_value(tmp_path: Path) -> None:
    path = write_set(tmp_path, [ann(1, [1, 1, 5, 5]), ann(2, [10, 10, 0, 5])])
    with pytest.raises(UserError) as info:
        read_coco(path, on_bad_box="error")
    message = str(info.value)
    assert message.startswith(f"{path}: annotations[1].bbox: [10, 10, 0, 5]: zero or negative size")
    assert "\n" not in message


def test_check_a_loaded_detection_set(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "x.png")
    bad = ImageRecord(1, tmp_path / "x.png", 20, 10, np.array([[0, 0, 5, 5], [3, 3, 3, 8]]), np.array([0, 5]),
                      np.zeros(2, bool), np.zeros(2, bool))
    same_id = bad.select(np.array([0]))
    report = check_dataset(DetectionSet([bad, same_id], ["a"], [1], "mem"))
    assert sorted(kinds(report)) == ["bad_label", "degenerate_box", "duplicate_image_id"]


# ---------------------------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------------------------


def test_voc_problems(tmp_path: Path) -> None:
    base = tiny_voc(tmp_path)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n000011\n")
    (base / "Annotations" / "000007.xml").write_text(voc_xml([("dragon", (1, 1, 5, 5), 0), ("cat", (9, 9, 4, 20), 0)]))
    (base / "Annotations" / "000011.xml").write_text("<annotation><size>")
    report = check_dataset(tmp_path, verify_images=True)
    assert kinds(report) == ["unknown_category", "degenerate_box", "missing_xml", "bad_xml"]
    assert report.problems[0].field == "object[0].name" and report.problems[0].value == "dragon"
    report = check_dataset(tmp_path, split="val")
    assert kinds(report) == ["missing_split"]
    with pytest.raises(UserError, match="000007.xml: object.0..name: dragon"):
        read_voc(tmp_path, on_bad_box="error")


def test_voc_missing_image_is_reported(tmp_path: Path) -> None:
    base = tiny_voc(tmp_path)
    (base / "JPEGImages" / "000007.jpg").unlink()
    report = check_dataset(base)
    assert kinds(report) == ["missing_image"] and report.problems[0].file.endswith("000007.jpg")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_check_exit_codes_and_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_set(tmp_path)
    assert main(["data", "check", str(path)]) == 0
    assert "no problems found" in capsys.readouterr().out
    (tmp_path / "1.png").unlink()
    path = write_set(tmp_path, [ann(1, [1, 1, 5, 5]), ann(2, [10, 10, 0, 5])], make_images=False)
    assert main(["data", "check", str(path)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert f"{path}: annotations[1].bbox: [10, 10, 0, 5]: zero or negative size box (width 0, height 5)" in lines
    assert any(line.startswith(str(tmp_path / "1.png") + ": images[0].file_name: 1.png: image file not found")
               for line in lines)
    assert lines[-1].startswith("summary:") and "2 problems" in lines[-1]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["data", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
