"""Progress lines from inside one candidate's proxy training, so a long candidate visibly makes progress.

At the paper's proxy settings one candidate trains for many minutes on a CPU; the search's own bar only moves
when a candidate finishes. :class:`CandidateProgress` prints, at most every ``interval`` seconds (default 30;
a candidate that finishes sooner prints nothing), one line to stderr::

    proxy 3f2a1b9c: epoch 2/15 step 40/120 | loss 2.3456 | elapsed 1:23 | ETA 4:56

``ETA`` is for the full run of ``epochs`` (early stopping can end a candidate sooner). The line comes from
whatever process trains the candidate; spawned worker processes inherit the parent's stderr and environment.

The setting travels in the environment variable ``NASFCOS_PROXY_PROGRESS`` (seconds between lines; ``0``
turns the lines off) because it must reach worker processes without becoming part of the proxy config: the
config is the search's identity on ``--resume``, and whether lines are printed must not change it.
:func:`candidate_progress` is what ``run_search(progress=False)`` uses to silence them for one run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO

__all__ = ["PROGRESS_ENV", "DEFAULT_INTERVAL_S", "CandidateProgress", "candidate_progress", "progress_interval"]

PROGRESS_ENV = "NASFCOS_PROXY_PROGRESS"
DEFAULT_INTERVAL_S = 30.0
_OFF_WORDS = ("0", "off", "false", "no", "none")


def progress_interval() -> float:
    """Seconds between progress lines from :data:`PROGRESS_ENV` (0 = off; unset or unreadable = the default)."""
    raw = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_INTERVAL_S
    if raw in _OFF_WORDS:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if math.isfinite(value) and value > 0 else 0.0


def candidate_progress(enabled: bool) -> Callable[[], None]:
    """Turn the lines off (``enabled=False``) for this process and the workers it starts from now on.

    Returns a function that restores the previous setting. ``enabled=True`` leaves the environment as it is
    (a user's own ``NASFCOS_PROXY_PROGRESS=0`` still wins).
    """
    if enabled:
        return lambda: None
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"

    def restore() -> None:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous

    return restore


def format_duration(seconds: float) -> str:
    """``83`` -> ``1:23``; ``3725`` -> ``1:02:05``; not finite -> ``?``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class CandidateProgress:
    """Throttled ``epoch i/n step j/m | loss | elapsed | ETA`` lines for one candidate's training loop."""

    def __init__(self, label: str, epochs: int, *, interval: float | None = None, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.epochs = int(epochs)
        self.interval = progress_interval() if interval is None else float(interval)
        self.stream = stream
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self.lines = 0

    def line(self, epoch: int, step: int, steps: int, loss: float) -> str:
        """The text for having finished ``step`` of ``steps`` in ``epoch`` with running mean ``loss``."""
        elapsed = self._clock() - self._start
        done = (epoch - 1) * steps + step
        total = self.epochs * steps
        eta = (total - done) * elapsed / done if done > 0 else float("nan")
        return (f"proxy {self.label}: epoch {epoch}/{self.epochs} step {step}/{steps} | loss {loss:.4f} | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")

    def update(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """Print a line if ``interval`` seconds passed since the last one (or the start)."""
        if self.interval <= 0:
            return
        now = self._clock()
        if now - self._last < self.interval:
            return
        self._last = now
        stream = self.stream if self.stream is not None else sys.stderr
        text = self.line(epoch, step, steps, loss)
        prefix = "\r\x1b[K" if getattr(stream, "isatty", lambda: False)() else ""  # clear a bar on a terminal
        try:
            stream.write(prefix + text + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the candidate
            self.interval = 0.0
            return
        self.lines += 1
