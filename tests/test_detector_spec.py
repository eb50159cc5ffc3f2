"""DetectorSpec: the width precedence (suffix, explicit width, preset), the file format, old files, and trained
models that come back from their weights file exactly as they were trained (widths and inference settings)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from nasfcos.cli import main
from nasfcos.detection.spec import DetectorSpec
from nasfcos.detection.weights import read_detector_file
from nasfcos.errors import UserError
from nasfcos.space.presets import PRESETS
from nasfcos.train.trainer import load_trained_model

from conftest import tiny_train_overrides

# ------------------------------------------------------------------------------------------------ precedence


def test_suffix_sets_the_widths_and_an_explicit_width_overrides_only_the_preset() -> None:
    assert (DetectorSpec.resolve("nas-fcos@16").fpn_width, DetectorSpec.resolve("nas-fcos@16").head_width) == (16, 16)
    spec = DetectorSpec.resolve("nas-fcos@128-256")
    assert (spec.fpn_width, spec.head_width) == (128, 256)
    # No suffix: an explicit width beats the preset's 256; the other width keeps the preset's.
    spec = DetectorSpec.resolve("nas-fcos", fpn_width=64)
    assert (spec.fpn_width, spec.head_width) == (64, 256)
    # The same width given twice is fine.
    assert DetectorSpec.resolve("nas-fcos@16", fpn_width=16, head_width=16).fpn_width == 16
    # A genotype (no preset widths) gets 256 / 256 / grouped.
    spec = DetectorSpec.resolve(PRESETS["nas-fcos"].genotype)
    assert (spec.fpn_width, spec.head_width, spec.concat) == (256, 256, "grouped")


@pytest.mark.parametrize(
    ("arch", "options", "pattern"),
    [
        ("nas-fcos@16", {"fpn_width": 64}, r"^fpn_width: 64 conflicts with arch 'nas-fcos@16', whose @ suffix sets this width to 16"),
        ("nas-fcos@128-256", {"head_width": 128}, r"^head_width: 128 conflicts with arch 'nas-fcos@128-256'.* to 256"),
        ("nas-fcos@16", {"fpn_width": 64, "labels": {"fpn_width": "--fpn-width"}}, r"^--fpn-width: 64 conflicts"),
    ],
)
def test_a_width_that_contradicts_the_suffix_is_a_one_line_error(arch: str, options: dict, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern) as info:
        DetectorSpec.resolve(arch, **options)
    assert "\n" not in str(info.value)


def test_train_refuses_a_suffix_and_a_contradicting_width_and_creates_nothing(tiny_synth: Path, tmp_path: Path,
                                                                             capsys) -> None:
    out = tmp_path / "run"
    overrides = [a for o in tiny_train_overrides(tiny_synth) if "width" not in o and "arch" not in o
                 for a in ("--set", o)]
    code = main(["train", "--arch", "nas-fcos@16", "--fpn-width", "64", *overrides, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.fpn_width: 64 conflicts with arch 'nas-fcos@16'" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ file format


def test_spec_round_trips_through_plain_data_and_rejects_foreign_dicts() -> None:
    spec = DetectorSpec.resolve("nas-fcos@32-64", backbone="resnet18", num_classes=3, min_size=(96, 128),
                                score_thresh=0.2, nms_thresh=0.4, pre_nms_top_n=50, detections_per_img=7)
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only (weights_only-safe)
    assert DetectorSpec.from_dict(data) == spec
    with pytest.raises(UserError, match="unknown detector spec key"):
        DetectorSpec.from_dict({**data, "colour": "red"})
    with pytest.raises(UserError, match="version 99"):
        DetectorSpec.from_dict({**data, "version": 99})


def test_old_files_without_a_spec_still_load(tmp_path: Path) -> None:
    """A flat meta (written before the spec): widths from the arch suffix, inference settings at the old defaults."""
    torch.manual_seed(0)
    from nasfcos.detection.detector import build_detector

    model = build_detector("nas-fcos@16", backbone="resnet18", num_classes=2, min_size=96, max_size=128)
    meta = {"genotype": PRESETS["nas-fcos"].genotype.to_json(), "arch": "nas-fcos@16", "backbone": "resnet18",
            "num_classes": 2, "fpn_width": None, "head_width": None, "fcos": "vanilla", "concat": None,
            "class_names": ["a", "b"], "category_ids": [1, 2], "min_size": [96], "test_min_size": 96,
            "max_size": 128, "size_divisible": 32}
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    loaded, described = load_trained_model(path)
    assert (loaded.spec.fpn_width, loaded.spec.head_width) == (16, 16)
    assert (loaded.score_thresh, loaded.nms_thresh, loaded.pre_nms_top_n, loaded.detections_per_img) == (
        0.05, 0.6, 1000, 100)
    assert described["class_names"] == ["a", "b"] and described["num_classes"] == 2
    torch.save({"model": model.state_dict(), "meta": {"backbone": "resnet18"}}, path)  # no genotype
    with pytest.raises(UserError, match="genotype"):
        load_trained_model(path)


# ------------------------------------------------------------------------------------------------ trained models


def _train(tiny_synth: Path, out: Path, *flags: str, drop: tuple[str, ...] = ()) -> Path:
    overrides = [a for o in tiny_train_overrides(tiny_synth, iters=2)
                 if not any(o.startswith(d) for d in drop) for a in ("--set", o)]
    assert main(["train", *flags, *overrides, "--out", str(out)]) == 0
    return out / "model_final.pt"


def test_a_suffix_width_model_reloads_at_its_training_widths(tiny_synth: Path, tmp_path: Path) -> None:
    """``--arch nas-fcos@16`` and no width in the config: trained, saved, evaluated and reloaded at 16."""
    weights = _train(tiny_synth, tmp_path / "run", "--arch", "nas-fcos@16",
                     drop=("model.arch", "model.fpn_width", "model.head_width"))
    saved = read_detector_file(weights).spec
    assert saved is not None and (saved.fpn_width, saved.head_width) == (16, 16)
    model, described = load_trained_model(weights)
    assert model.spec == saved and described["fpn_width"] == 16
    assert model.decoder.head.predictor.cls_logits.in_channels == 16
    assert model.decoder.fpn.width == 16
    # The checkpoints carry the same spec.
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert read_detector_file(checkpoint).spec == saved
    assert main(["eval", "--checkpoint", str(weights), "--data", str(tiny_synth), "--out", str(tmp_path / "e")]) == 0


def test_inference_settings_travel_with_the_weights_to_eval_and_predict(tiny_synth: Path, tmp_path: Path) -> None:
    """score_thresh 0.001 (below the default 0.05), at most 7 detections per image: eval and predict obey both."""
    settings = ["model.score_thresh=0.001", "model.nms_thresh=0.5", "model.pre_nms_top_n=50",
                "model.detections_per_img=7"]
    weights = _train(tiny_synth, tmp_path / "run", *[a for s in settings for a in ("--set", s)])
    model, _ = load_trained_model(weights)
    assert (model.score_thresh, model.nms_thresh, model.pre_nms_top_n, model.detections_per_img) == (
        0.001, 0.5, 50, 7)

    assert main(["eval", "--checkpoint", str(weights), "--data", str(tiny_synth), "--out", str(tmp_path / "e")]) == 0
    images = sorted((tiny_synth / "images" / "val").iterdir())[:3]
    assert main(["predict", "--checkpoint", str(weights), *map(str, images), "--out", str(tmp_path / "p"),
                 "--min-score", "0"]) == 0
    for folder in ("e", "p"):
        detections = json.loads((tmp_path / folder / "detections.json").read_text())
        per_image = Counter(d["image_id"] for d in detections)
        scores = [d["score"] for d in detections]
        assert per_image and max(per_image.values()) == 7 and all(n <= 7 for n in per_image.values()), folder
        assert min(scores) >= 0.001 and min(scores) < 0.05, folder  # the default threshold would have cut these
