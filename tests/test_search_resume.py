"""Kill-safety: a search interrupted at any moment resumes to exactly the run it would have been.

In-process interruptions (an exception at a chosen evaluation, or during the commit of a step) check the exact
protocol: the total is the budget, no genotype is trained twice, and the final store *and* strategy state
equal those of an uninterrupted run with the same seed. The last test SIGKILLs a real ``nasfcos search``
process in the middle of the search and resumes it with ``--resume``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import sigkill_once_stored

from nasfcos.search.config import load_search_run_config
from nasfcos.search.loop import LOOP_STATE_KEY, run_search
from nasfcos.search.store import ResultStore
from test_search_loop import (
    CALLS,
    CALLS_FILE_ENV,
    SLEEP_ENV,
    cache_dir,
    deterministic_evaluator,
    keys_in_order,
    quick_cfg,
    run_cfg,
)

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

#: Raise KeyboardInterrupt when the evaluator is about to make call number ``n`` (0-based), once.
INTERRUPT: dict[str, int | None] = {"at": None}


def interrupting_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                           early_stop_reference: Any = None) -> dict[str, Any]:
    if INTERRUPT["at"] is not None and len(CALLS) == INTERRUPT["at"]:
        INTERRUPT["at"] = None
        raise KeyboardInterrupt  # not an Exception: the loop stops like a killed process would
    return deterministic_evaluator(genotype, cache, cfg, seed=seed)


#: early_stop_reference values received, per candidate key.
RECEIVED: dict[str, Any] = {}


def early_stop_evaluator(genotype: Any, cache: Any, cfg: Any, *, seed: int,
                         early_stop_reference: Any = None) -> dict[str, Any]:
    """Like the deterministic fake, plus an early-epoch loss and a record of the reference it was given."""
    RECEIVED[genotype.key()] = early_stop_reference
    result = interrupting_evaluator(genotype, cache, cfg, seed=seed)
    result["early_stop_loss"] = 2.0 - result["reward"]
    return result


def _plain(value: Any) -> Any:
    """Tensors to (dtype, shape, values) so that states compare by content (torch.save bytes may differ)."""
    import torch

    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _state(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The committed strategy state (controller, optimiser, baseline, buffer, RNG) and loop state."""
    import io

    import torch

    with ResultStore(run_dir / "store.sqlite", readonly=True) as store:
        blob, loop_state = store.state_blob(), json.loads(store.get_meta(LOOP_STATE_KEY))
    return _plain(torch.load(io.BytesIO(blob), weights_only=True)), loop_state


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    RECEIVED.clear()
    INTERRUPT["at"] = None


def _reference(tmp_path: Path, cfg: Any, proxy: Any = None, evaluator: Any = deterministic_evaluator) -> Path:
    run_dir = tmp_path / "reference"
    run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, proxy), evaluator=evaluator, progress=False)
    CALLS.clear()
    return run_dir


# budget 8, batches of 3: [0 1 2] [3 4 5] [6 7]; 3 = first evaluation after the first commit.
@pytest.mark.parametrize("interrupt_at", [0, 2, 3, 7])
def test_interrupted_search_resumes_to_the_uninterrupted_run(tmp_path: Path, interrupt_at: int) -> None:
    cfg = quick_cfg(strategy="ppo", budget=8, batch_size=3)
    reference = _reference(tmp_path, cfg)
    run_dir = tmp_path / "run"
    INTERRUPT["at"] = interrupt_at
    with pytest.raises(KeyboardInterrupt):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg), evaluator=interrupting_evaluator, progress=False)
    assert len(keys_in_order(run_dir)) == interrupt_at
    summary = run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg), resume=True,
                         evaluator=interrupting_evaluator, progress=False)
    assert summary.evaluated == 8
    assert len(CALLS) == len(set(CALLS)) == 8  # nothing lost, nothing trained twice
    assert keys_in_order(run_dir) == keys_in_order(reference)
    assert _state(run_dir) == _state(reference)  # controller, optimiser, baseline, RNG, counters


def test_kill_between_results_and_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All of a batch's results are stored but its policy update is not committed: resume redoes the update
    without training anything again."""
    cfg = quick_cfg(strategy="ppo", budget=9, batch_size=3)
    reference = _reference(tmp_path, cfg)
    original = ResultStore.commit_step
    commits = {"n": 0}

    def failing_commit(self: ResultStore, results: Any, state_blob: Any = None, meta: Any = None) -> Any:
        if state_blob is not None:
            commits["n"] += 1
            if commits["n"] == 2:
                raise KeyboardInterrupt
        return original(self, results, state_blob, meta)

    monkeypatch.setattr(ResultStore, "commit_step", failing_commit)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg), evaluator=deterministic_evaluator, progress=False)
    assert len(keys_in_order(run_dir)) == 6 and _state(run_dir)[1]["step"] == 1
    monkeypatch.setattr(ResultStore, "commit_step", original)
    run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg), resume=True, evaluator=deterministic_evaluator,
               progress=False)
    assert len(CALLS) == len(set(CALLS)) == 9
    assert keys_in_order(run_dir) == keys_in_order(reference)
    assert _state(run_dir) == _state(reference)


def test_early_stop_reference_is_kept_committed_and_resumed(tmp_path: Path) -> None:
    from nasfcos.search.config import ProxyConfig
    from nasfcos.search.early_stop import EarlyStopReference

    proxy = ProxyConfig(early_stop=True, early_stop_decay=0.5, early_stop_epoch=1)
    cfg = quick_cfg(strategy="random", budget=8, batch_size=3)
    reference = _reference(tmp_path, cfg, proxy, early_stop_evaluator)
    received = dict(RECEIVED)
    with ResultStore(reference / "store.sqlite", readonly=True) as store:
        rows = store.all()
    # Every candidate of a batch got the reference committed after the previous batch (proposal order).
    expected = EarlyStopReference.for_config(proxy)
    for step in range(3):
        batch = [r for r in rows if r.controller_step == step]
        for row in batch:
            assert received[row.key] == expected.to_dict()
        for row in batch:
            expected.update(2.0 - row.reward)
    assert _state(reference)[1]["early_stop_reference"] == expected.to_dict()
    assert expected.count == 8

    RECEIVED.clear()
    run_dir = tmp_path / "run"
    INTERRUPT["at"] = 4  # in the middle of the second batch
    with pytest.raises(KeyboardInterrupt):
        run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, proxy), evaluator=early_stop_evaluator,
                   progress=False)
    run_search(run_dir, run_cfg(cache_dir(tmp_path), cfg, proxy), resume=True, evaluator=early_stop_evaluator,
               progress=False)
    assert _state(run_dir) == _state(reference)
    assert all(RECEIVED[k] == received[k] for k in RECEIVED)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_mid_search_then_resume(tmp_path: Path) -> None:
    """A real ``nasfcos search`` process is SIGKILLed after a few results; ``--resume`` completes it."""
    run_dir = tmp_path / "run"
    calls_before, calls_after = tmp_path / "calls-before.txt", tmp_path / "calls-after.txt"
    settings = ["search.tensorboard=false", "search.ppo.epochs=1", "search.ppo.buffer_size=16",
                "search.space.fixed_fpn=fpn-fcos", "search.space.num_head_layers=3",
                "search.space.head_ops=[conv3x3,skip,dcn3x3]"]
    set_args = [arg for s in settings for arg in ("--set", s)]
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "nasfcos.cli", "search", "--quiet"]
    first = [*command, "--cache", str(cache_dir(tmp_path)), "--evaluator", "test_search_loop:deterministic_evaluator",
             "--budget", "10", "--batch-size", "3", "--seed", "5", "--out", str(run_dir), *set_args]
    proc = subprocess.Popen(first, env={**base_env, SLEEP_ENV: "0.4", CALLS_FILE_ENV: str(calls_before)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigkill_once_stored(proc, run_dir / "store.sqlite", 4)
    stored_at_kill = keys_in_order(run_dir)
    assert 4 <= len(stored_at_kill) < 10

    resumed = subprocess.run([*command, "--resume", str(run_dir)], env={**base_env, CALLS_FILE_ENV: str(calls_after)},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "evaluated 10 architectures" in resumed.stdout

    final = keys_in_order(run_dir)
    after = _read_lines(calls_after)
    assert len(final) == len(set(final)) == 10
    assert len(after) == len(set(after))  # the resumed process trained nothing twice ...
    assert not set(after) & set(stored_at_kill)  # ... and nothing that was already stored
    assert set(stored_at_kill) | set(after) == set(final)
    assert set(stored_at_kill) <= set(_read_lines(calls_before))

    # Same seed, same settings, no interruption: the same sequence and the same final search state.
    cfg = load_search_run_config(None, None, [f"search.{k}={v}" for k, v in
                                              (("budget", 10), ("batch_size", 3), ("seed", 5))] + settings)
    reference = tmp_path / "reference"
    run_search(reference, run_cfg(cache_dir(tmp_path), cfg.search, cfg.proxy), evaluator=deterministic_evaluator,
               progress=False)
    assert final == keys_in_order(reference)
    assert _state(run_dir) == _state(reference)
