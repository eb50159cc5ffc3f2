"""Slow: the CPU training preset learns a real detector for ``fpn-fcos`` and ``nas-fcos`` on the synthetic set.

The preset itself (``configs/cpu-synth.yaml``: 256 px, 600 iterations) takes 20-40 minutes per architecture on
2 cores; its numbers are in ``benchmarks/results/cpu_preset_ap.md`` (``benchmarks/cpu_preset_ap.py``). This
test runs the same preset — same backbone trained from scratch, widths, optimiser, learning rate, warm-up,
clipping — shortened to 160 px and 300 iterations, and checks the COCO AP that
pycocotools measures on the 100 held-out validation images. A detector that learned nothing scores ~0.000;
the thresholds sit at about half of what the shortened runs reached when this test was written (quiet 2-core
machine, 892 s for both: fpn-fcos AP 0.041 / AP50 0.107, nas-fcos AP 0.050 / AP50 0.130).

Run with ``.venv/bin/python -m pytest -m slow tests/test_cpu_preset_slow.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORTENED = ["data.min_size=[160]", "data.test_min_size=160", "data.max_size=160", "solver.max_iter=300",
             "solver.steps=[225,275]", "runtime.checkpoint_period=150", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``nasfcos data synth`` default set (400 train / 100 val at 256 px), resized by the loader."""
    from nasfcos.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synth-default")
    ensure_synthetic(root, seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("arch, min_ap", [("fpn-fcos", 0.02), ("nas-fcos", 0.02)])
def test_cpu_preset_trains_to_ap_well_above_zero(arch: str, min_ap: float, synth_set: Path, tmp_path: Path) -> None:
    from nasfcos.config import TrainConfig, load_config
    from nasfcos.train.trainer import train

    cfg = load_config(TrainConfig, ROOT / "configs" / "cpu-synth.yaml",
                      [f"model.arch={arch}", "data.format=synthetic", f"data.train_path={synth_set}", *SHORTENED])
    result = train(cfg, tmp_path / arch, quiet=True)
    assert result.metrics is not None
    assert result.metrics["AP"] > min_ap, result.metrics
    assert result.metrics["AP50"] > 2 * min_ap, result.metrics
