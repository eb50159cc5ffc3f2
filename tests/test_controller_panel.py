"""The report's controller panel, fed by the real PPO trainer's diagnostics: learning and stalled runs read
differently, in the numbers under the figure and in the figure itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nasfcos.analysis.plots import CONTROLLER_PANELS, plot_controller_diagnostics
from nasfcos.analysis.report import controller_reading, write_report
from nasfcos.logs import RunLogger
from nasfcos.search.controller import Controller
from nasfcos.search.ppo import PPOTrainer, Sample
from nasfcos.space.search_space import SearchSpace

from known_rewards import dcn_concat_share
from test_report import assert_png, make_search_run


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _history(lr: float, updates: int) -> list[dict[str, float]]:
    """Diagnostics of the real controller + trainer on the known-optimum reward, batches of 8, on-policy."""
    space = SearchSpace()
    generator = torch.Generator().manual_seed(0)
    controller = Controller(space, generator=generator)
    trainer = PPOTrainer(controller, lr=lr, buffer_size=8, normalize_advantages=True)
    history = []
    for _ in range(updates):
        with torch.no_grad():
            actions, log_probs, _ = controller.sample(8, generator=generator)
        batch = [Sample(tuple(a), lp, dcn_concat_share(space.decode(a)))
                 for a, lp in zip(actions.tolist(), log_probs.tolist())]
        history.append(trainer.update(batch))
    return history


@pytest.fixture(scope="module")
def learning() -> list[dict[str, float]]:
    return _history(3e-3, 16)


@pytest.fixture(scope="module")
def stalled() -> list[dict[str, float]]:
    return _history(0.0, 6)


def _series(history: list[dict[str, float]]) -> dict[str, tuple[list[float], list[float]]]:
    keys = [key for _, lines in CONTROLLER_PANELS for key, _, _ in lines]
    xs = [float(i + 1) for i in range(len(history))]
    return {key: (xs, [d[key] for d in history]) for key in keys}


def _search_run(folder: Path, history: list[dict[str, float]]) -> Path:
    """A search run folder (real store) whose log.jsonl holds ``history`` the way the search loop logs it."""
    folder.mkdir()
    make_search_run(folder, n=20, log=False)
    logger = RunLogger(folder, use_tensorboard=False, enabled=True)
    for step, stats in enumerate(history, start=1):
        logger.log(step, stats, prefix="update")
    logger.close()
    return folder


def test_reading_separates_learning_from_stalled(learning, stalled) -> None:
    learn = "\n".join(controller_reading(_series(learning)))
    stall = "\n".join(controller_reading(_series(stalled)))
    assert "never moved" in stall and "never moved" not in learn
    assert "more certain" in learn and "more certain" not in stall
    assert "16 controller updates." in learn and "6 controller updates." in stall
    # The numbers quoted are the trainer's: the last-quarter KL of the learning run (4 updates).
    last_kl = sum(d["kl"] for d in learning[-4:]) / 4
    assert f"last quarter {last_kl:.3f}" in learn
    assert "entropy / maximum: first quarter 100 %" in stall


def test_panel_png_and_report_section_from_real_diagnostics(tmp_path: Path, learning, stalled) -> None:
    png = plot_controller_diagnostics(_series(learning), tmp_path / "panel.png")
    assert_png(png, min_size=(900, 500))
    for name, history in (("learning", learning), ("stalled", stalled)):
        run = _search_run(tmp_path / name, history)
        text = write_report(run).read_text()
        assert "figures/controller.png" in text
        assert "KL(pre || post) per update" in text and "How to read it" in text
        assert_png(run / "figures" / "controller.png", min_size=(900, 500))
    assert "never moved" in (tmp_path / "stalled" / "report.md").read_text()
    assert "never moved" not in (tmp_path / "learning" / "report.md").read_text()


def test_panel_skips_missing_series_and_logs_without_new_keys(tmp_path: Path) -> None:
    xs = [1.0, 2.0, 3.0]
    png = plot_controller_diagnostics({"kl": (xs, [0.1, 0.2, math.nan])}, tmp_path / "kl_only.png")
    assert_png(png)
    # An old-format log (entropy and baseline only) still gets the generic panel and a note why.
    run = tmp_path / "old"
    run.mkdir()
    make_search_run(run, n=20, log=True)
    text = write_report(run).read_text()
    assert "figures/controller.png" in text and "predates the diagnostics" in text
