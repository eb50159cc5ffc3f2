"""Progress inside one candidate: throttled ``epoch i/n step j/m | loss | elapsed | ETA`` lines on stderr from
the real proxy, silenced by ``NASFCOS_PROXY_PROGRESS=0`` and by ``run_search(progress=False)``."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from nasfcos.search.candidate_progress import (
    DEFAULT_INTERVAL_S,
    PROGRESS_ENV,
    CandidateProgress,
    candidate_progress,
    format_duration,
    progress_interval,
)

LINE = re.compile(r"^proxy \w+: epoch \d+/\d+ step \d+/\d+ \| loss \d+\.\d{4} \| elapsed [\d:]+ \| ETA [\d:?]+$")


class Clock:
    """A clock the test moves by hand (the reporter's only notion of time)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_throttled_and_the_eta_is_for_the_whole_run() -> None:
    clock, out = Clock(), io.StringIO()
    reporter = CandidateProgress("abc", epochs=4, interval=30, stream=out, clock=clock)
    clock.now += 10
    reporter.update(1, 2, 10, 3.0)  # 10 s after the start: too soon
    assert out.getvalue() == ""
    clock.now += 21
    reporter.update(1, 5, 10, 2.5)
    # 31 s for 5 of 4 x 10 steps: 35 steps left at 6.2 s each = 217 s = 3:37.
    assert out.getvalue() == "proxy abc: epoch 1/4 step 5/10 | loss 2.5000 | elapsed 0:31 | ETA 3:37\n"
    clock.now += 29
    reporter.update(1, 9, 10, 2.0)  # 29 s after the last line: too soon
    clock.now += 2
    reporter.update(2, 1, 10, 1.75)  # 62 s, 11 steps done, 29 left: 29 * 62 / 11 = 163.45 s
    assert out.getvalue().splitlines()[1] == "proxy abc: epoch 2/4 step 1/10 | loss 1.7500 | elapsed 1:02 | ETA 2:43"
    assert reporter.lines == 2


def test_interval_zero_prints_nothing() -> None:
    clock, out = Clock(), io.StringIO()
    reporter = CandidateProgress("abc", epochs=1, interval=0, stream=out, clock=clock)
    for step in range(1, 5):
        clock.now += 1000
        reporter.update(1, step, 4, 1.0)
    assert out.getvalue() == "" and reporter.lines == 0


def test_durations() -> None:
    assert [format_duration(s) for s in (0, 59.4, 83, 3725, float("nan"), -1)] == \
        ["0:00", "0:59", "1:23", "1:02:05", "?", "?"]


@pytest.mark.parametrize(("value", "expected"), [(None, DEFAULT_INTERVAL_S), ("", DEFAULT_INTERVAL_S), ("5", 5.0),
                                                 ("0", 0.0), ("off", 0.0), ("-3", 0.0), ("soon", DEFAULT_INTERVAL_S)])
def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: float) -> None:
    if value is None:
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(PROGRESS_ENV, value)
    assert progress_interval() == expected


def test_disabling_for_a_run_restores_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv(PROGRESS_ENV, "7")
    restore = candidate_progress(False)
    assert os.environ[PROGRESS_ENV] == "0" and progress_interval() == 0
    restore()
    assert os.environ[PROGRESS_ENV] == "7"
    monkeypatch.delenv(PROGRESS_ENV)
    candidate_progress(True)()  # enabling changes nothing
    restore = candidate_progress(False)
    restore()
    assert PROGRESS_ENV not in os.environ


# ------------------------------------------------------------------------------------------- the real proxy


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-image synthetic feature cache (ResNet-18, 64 px crops): seconds to build."""
    from nasfcos.data.cache import build_cache
    from nasfcos.data.synthetic import make_synthetic, read_synthetic

    root = tmp_path_factory.mktemp("progress-cache")
    info = make_synthetic(root / "synth", seed=0, num_train=12, num_val=4, image_size=64)
    build_cache(read_synthetic(info, "train"), root / "cache", backbone="resnet18", crop=64, meta_train=8, seed=0,
                batch_size=8, device="cpu", threads=1, progress=False)
    return root / "cache"


def _proxy():
    from nasfcos.search.config import ProxyConfig

    return ProxyConfig(width=8, epochs=2, batch_size=4, device="cpu", threads=1, early_stop=False)


def proxy_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("proxy ")]


def test_the_proxy_reports_epochs_on_stderr(small_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    from nasfcos.search.proxy import evaluate_candidate
    from nasfcos.space.presets import PRESETS

    genotype = PRESETS["fpn-fcos"].genotype
    monkeypatch.setenv(PROGRESS_ENV, "1e-9")  # a line after every step: 2 epochs x 2 batches of 4 of 8 images
    capfd.readouterr()
    result = evaluate_candidate(genotype, small_cache, _proxy(), seed=0)
    assert result.status == "ok", result.error
    lines = proxy_lines(capfd.readouterr().err)
    assert [line.split(" | ")[0] for line in lines] == [
        f"proxy {genotype.key()[:8]}: epoch {e}/2 step {s}/2" for e in (1, 2) for s in (1, 2)]
    assert all(LINE.match(line) for line in lines), lines
    monkeypatch.setenv(PROGRESS_ENV, "0")
    evaluate_candidate(genotype, small_cache, _proxy(), seed=0)
    assert proxy_lines(capfd.readouterr().err) == []


@pytest.mark.parametrize("progress", [True, False])
def test_run_search_progress_flag_reaches_the_candidates(
        tmp_path: Path, small_cache: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        progress: bool) -> None:
    import os

    from nasfcos.search.config import SearchConfig, SearchRunConfig, SpaceConfig
    from nasfcos.search.loop import run_search

    monkeypatch.setenv(PROGRESS_ENV, "1e-9")
    search = SearchConfig(budget=1, batch_size=1, seed=0, tensorboard=False, executor="inline",
                          space=SpaceConfig(fixed_fpn="fpn-fcos", num_head_layers=2, head_ops=("conv3x3", "skip")))
    cfg = SearchRunConfig(cache=str(small_cache), search=search, proxy=_proxy())
    capfd.readouterr()
    summary = run_search(tmp_path / "run", cfg, progress=progress)
    assert summary.evaluated == 1 and summary.failed == 0
    lines = proxy_lines(capfd.readouterr().err)
    assert (len(lines) == 4) if progress else (lines == [])
    assert os.environ[PROGRESS_ENV] == "1e-9"  # restored after the run
