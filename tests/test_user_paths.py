"""A mistyped or wrong path never makes data: every command that reads one fails with one line, exit 2, and
creates nothing (no synthetic set, no run folder, no cache folder, no output folder).

Each case goes through the real entry point (:func:`nasfcos.cli.main`) from inside a scratch folder, so even
a default location (``runs/...``) that a command might create would show up in the before/after listing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nasfcos.cli import main
from nasfcos.config import DataConfig
from nasfcos.data.sources import check_data_paths, load_split
from nasfcos.errors import UserError

CPU_SYNTH = str(Path(__file__).resolve().parents[1] / "configs" / "cpu-synth.yaml")


def listing(*roots: Path) -> set[str]:
    """Every path under ``roots`` (files and folders), to compare before and after a command."""
    return {str(p) for root in roots for p in [root, *root.rglob("*")]}


@pytest.fixture()
def workdir(tmp_path: Path, tiny_synth: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder (the current directory) holding a copy of the tiny synthetic set as ``s`` and a file."""
    shutil.copytree(tiny_synth, tmp_path / "s")
    (tmp_path / "a-file.txt").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str], roots: list[Path], *needles: str) -> str:
    """Run ``nasfcos ARGV``; assert exit 2, exactly one stderr line containing ``needles``, nothing created."""
    capsys.readouterr()
    before = listing(*roots)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert listing(*roots) == before
    return lines[0]


TRAIN = ["train", "--config", CPU_SYNTH]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # the case: a typo in --data once generated a synthetic set there and started training
        (TRAIN + ["--data", "typo/synth", "--out", "run"], ["--data", "typo/synth", "folder not found"]),
        (TRAIN + ["--data", "s/annotations/train.json", "--out", "run"],
         ["--data", "s/annotations/train.json", "is a file"]),
        (TRAIN + ["--data", "a-file.txt"], ["--data", "a-file.txt", "is a file"]),
        (TRAIN + ["--data", "s/images", "--out", "run"], ["--data", "s/images", "not a synthetic set"]),
        # no --data: the default folder is read if it holds a set, never made
        (TRAIN + ["--out", "run"], ["data.train_path", "runs/data/synth", "folder not found"]),
        (TRAIN + ["--set", "data.train_path=typo", "--out", "run"], ["data.train_path", "typo"]),
        (["train", "--format", "coco", "--data", "s", "--out", "run"], ["--data", "is a folder", "COCO"]),
        (["train", "--format", "coco", "--data", "missing.json", "--out", "run"], ["--data", "missing.json", "not found"]),
        (["train", "--format", "coco", "--data", "s/annotations/train.json", "--images", "nope", "--out", "run"],
         ["--images", "nope", "folder not found"]),
        (["train", "--format", "coco", "--data", "s/annotations/train.json", "--images", "s/images/train",
          "--val", "s/annotations/missing.json", "--out", "run"], ["--val", "missing.json", "not found"]),
        (["train", "--format", "voc", "--data", "VOCdevkit:trainval", "--out", "run"],
         ["--data", "VOCdevkit", "folder not found"]),
        (TRAIN + ["--data", "s", "--arch", "missing-genotype.json", "--out", "run"], ["--arch", "missing-genotype.json"]),
        (TRAIN + ["--data", "s", "--pretrained", "missing.pth", "--out", "run"], ["--pretrained", "missing.pth"]),
        (TRAIN + ["--data", "s", "--out", "a-file.txt"], ["--out", "a-file.txt", "is a file"]),
        (TRAIN + ["--data", "s", "--resume", "--out", "no-such-run"], ["--out", "no-such-run", "not found"]),
        (TRAIN + ["--data", "typo"], ["--data", "typo"]),  # default run folder runs/train-... not made either
    ],
)
def test_train_bad_paths(workdir: Path, tiny_synth: Path, capsys: pytest.CaptureFixture[str],
                         argv: list[str], needles: list[str]) -> None:
    run_failing(argv, capsys, [workdir, tiny_synth], *needles)


def test_train_incomplete_synthetic_set(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "s" / "annotations" / "val.json").unlink()
    run_failing(TRAIN + ["--data", "s", "--out", "run"], capsys, [workdir], "--data", "annotations/val.json")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # the case: it tried to create folders inside the JSON file (NotADirectoryError traceback)
        (["--format", "synthetic", "--data", "s/annotations/train.json"], ["--data", "train.json", "is a file"]),
        (["--format", "synthetic", "--data", "typo"], ["--data", "typo", "not found"]),
        (["--data", "typo"], ["--data", "typo", "not found"]),
        (["--format", "coco", "--data", "s"], ["--data", "is a folder"]),
        (["--format", "coco", "--data", "s/annotations/train.json", "--images", "nope"], ["--images", "nope"]),
        (["--data", "s", "--weights", "missing.pth"], ["--weights", "missing.pth", "not found"]),
        (["--data", "s", "--detector-weights", "s"], ["--detector-weights", "is a folder"]),
    ],
)
def test_cache_bad_paths(workdir: Path, tiny_synth: Path, capsys: pytest.CaptureFixture[str],
                         argv: list[str], needles: list[str]) -> None:
    argv = ["cache", *argv, "--backbone", "resnet18", "--crop", "64", "--out", "cache-out"]
    run_failing(argv, capsys, [workdir, tiny_synth], *needles)


def test_cache_out_is_a_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_failing(["cache", "--data", "s", "--backbone", "resnet18", "--out", "a-file.txt"], capsys, [workdir],
                "--out", "a-file.txt", "is a file")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["eval", "--checkpoint", "missing.pt", "--data", "s"], ["--checkpoint", "missing.pt", "not found"]),
        (["eval", "--checkpoint", "s", "--data", "s"], ["--checkpoint", "is a folder"]),
        (["eval", "--checkpoint", "a-file.txt", "--data", "typo"], ["--data", "typo", "not found"]),
        (["eval", "--checkpoint", "a-file.txt", "--data", "s", "--format", "coco"], ["--data", "is a folder"]),
        (["eval", "--checkpoint", "a-file.txt", "--data", "s/annotations/train.json", "--format", "synthetic"],
         ["--data", "is a file"]),
        (["eval", "--checkpoint", "a-file.txt", "--data", "s", "--out", "a-file.txt"], ["--out", "is a file"]),
        (["predict", "--checkpoint", "missing.pt", "s/images/val", "--out", "pred"], ["--checkpoint", "missing.pt"]),
        (["predict", "--checkpoint", "a-file.txt", "typo.png", "--out", "pred"], ["typo.png", "not found"]),
        (["predict", "--checkpoint", "a-file.txt", "s/images/val", "--out", "a-file.txt"], ["--out", "is a file"]),
    ],
)
def test_eval_and_predict_bad_paths(workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                    needles: list[str]) -> None:
    run_failing(argv, capsys, [workdir], *needles)


def test_eval_bad_data_is_reported_before_the_model_is_loaded(
        workdir: Path, tiny_trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real checkpoint with a mistyped --data: the data error, and no detections.json next to the weights."""
    weights = str(tiny_trained_run / "model_final.pt")
    run_failing(["eval", "--checkpoint", weights, "--data", "typo"], capsys, [workdir, tiny_trained_run], "--data")


def test_load_split_never_generates(tmp_path: Path) -> None:
    """The library reads a synthetic set only where one exists; errors name the config key."""
    target = tmp_path / "not-yet"
    with pytest.raises(UserError, match=r"^data\.train_path: .*not-yet: folder not found"):
        load_split(DataConfig(format="synthetic", train_path=str(target)), "train")
    assert not target.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a synthetic set"):
        check_data_paths(DataConfig(format="synthetic", train_path=str(tmp_path / "empty")))
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_real_set_still_reads(tiny_synth: Path) -> None:
    """The checks accept what `nasfcos data synth` wrote (16 train, 8 val images in the fixture)."""
    cfg = DataConfig(format="synthetic", train_path=str(tiny_synth))
    assert len(load_split(cfg, "train")) == 16
    assert len(load_split(cfg, "val")) == 8
    coco = DataConfig(format="coco", train_path=str(tiny_synth / "annotations" / "train.json"),
                      train_images=str(tiny_synth / "images" / "train"))
    assert len(load_split(coco, "train")) == 16
