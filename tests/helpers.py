"""Helpers several test modules share (plain functions; fixtures live in ``conftest.py``)."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as the scripts import each other (``benchmarks/`` on ``sys.path``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def stored_count(store_path: Path) -> int:
    """Results in a search store, 0 while it does not exist yet (or is being created)."""
    from nasfcos.search.store import ResultStore

    try:
        with ResultStore(store_path, readonly=True) as store:
            return store.count()
    except Exception:
        return 0


def sigkill_once_stored(proc: subprocess.Popen[str], store_path: Path, count: int, deadline_s: float = 300) -> None:
    """Wait until the search in ``proc`` has stored ``count`` results, then ``kill -9`` it (no cleanup runs)."""
    try:
        deadline = time.monotonic() + deadline_s
        while stored_count(store_path) < count:
            assert proc.poll() is None, f"search ended early: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
            assert time.monotonic() < deadline, "search made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
