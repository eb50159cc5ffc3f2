"""Run logs: one JSON object per line, TensorBoard scalars, and a readable progress bar.

Shared by training and the search (both write a run folder), so it sits at the top level of the package next
to :mod:`nasfcos.io`, below every layer that logs.

``log.jsonl`` is the run's durable record (reports and plots read it): every line is a complete JSON object
with ``step``, ``time`` (Unix seconds) and the scalars, appended and flushed line by line so a killed run
leaves a readable file. Non-finite values (a NaN loss is exactly what one wants to see afterwards) are written
as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` — strict JSON, and ``float()`` reads them back.
TensorBoard is optional: without the ``tensorboard`` package the logger warns once and writes JSONL only.
Only the main process (rank 0) writes; other ranks get a logger that does nothing.

The progress bar uses tqdm on a terminal; when stderr is not a terminal or a ``CI`` environment variable is
set it prints one plain line per ``text_every`` updates instead (a batch log stays readable).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["ProgressBar", "RunLogger", "format_eta", "format_scalars", "read_log", "to_float"]

LOG_FILE = "log.jsonl"


def _main_process() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def to_float(value: Any) -> float:
    """A Python float from a number, 0-d tensor or NumPy scalar."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _json_number(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _json_safe(value: Any) -> Any:
    """Make ``value`` strict-JSON: tensors/NumPy to numbers or lists, non-finite floats to strings."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class RunLogger:
    """Append scalars to ``<run_dir>/log.jsonl`` and TensorBoard.

    ``enabled`` defaults to "this is the main process". Use as a context manager or call :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike[str], use_tensorboard: bool = True,
                 enabled: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = _main_process() if enabled is None else enabled
        self.path = self.run_dir / LOG_FILE
        self._file: IO[str] | None = None
        self._writer: Any = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to log.jsonl only", stacklevel=2)
            else:
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._writer is not None

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def log(self, step: int, scalars: Mapping[str, Any], prefix: str | None = None) -> None:
        """One line ``{"step", "time", **scalars}``; names get ``prefix/`` in TensorBoard and the line."""
        if not self.enabled:
            return
        values = {(f"{prefix}/{k}" if prefix else k): to_float(v) for k, v in scalars.items()}
        self._write({"step": int(step), "time": time.time(), **values})
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, int(step))

    def log_event(self, event: str, step: int | None = None, **fields: Any) -> None:
        """A non-scalar record (``{"event": "eval", "step", "time", ...}``), JSONL only."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": None if step is None else int(step), "time": time.time(), "event": event}
        record.update(fields)
        self._write(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of a ``log.jsonl`` (a torn last line from a killed run is skipped)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------------------------


def format_scalars(scalars: Mapping[str, Any], digits: int = 4) -> str:
    """``"loss 1.234 cls 0.5"`` — compact, fixed significant digits, learning rates in ``e`` notation."""
    parts = []
    for name, value in scalars.items():
        number = to_float(value)
        text = f"{number:.2e}" if name == "lr" or (number != 0 and abs(number) < 1e-3) else f"{number:.{digits}g}"
        parts.append(f"{name} {text}")
    return " ".join(parts)


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _tty_allowed(stream: IO[str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class ProgressBar:
    """Training progress: step/total, losses, lr, it/s and ETA.

    On a terminal (and without ``CI`` set) this is a tqdm bar; otherwise, every ``text_every`` updates (0 =
    never) one plain line ``step 120/90000 | loss 1.23 ... | lr 1.00e-02 | 3.2 it/s | ETA 7:48:00`` goes to
    ``stream``. Non-main processes show nothing.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", stream: IO[str] | None = None,
                 enabled: bool | None = None, text_every: int = 20, use_tqdm: bool | None = None) -> None:
        self.total = int(total)
        self.step = int(initial)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _main_process() if enabled is None else enabled
        self.text_every = text_every
        self._start_time = time.monotonic()
        self._start_step = self.step
        self._updates = 0
        self._bar: Any = None
        if self.enabled and (_tty_allowed(self.stream) if use_tqdm is None else use_tqdm):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.step, desc=desc, file=self.stream, dynamic_ncols=True,
                             bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {rate_fmt} ETA {remaining} {postfix}",
                             unit="it")

    def rate(self) -> float:
        """Iterations per second since this bar started."""
        elapsed = time.monotonic() - self._start_time
        done = self.step - self._start_step
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def line(self, scalars: Mapping[str, Any]) -> str:
        """The plain text line for the current state."""
        rate = self.rate()
        eta = (self.total - self.step) / rate if rate > 0 else float("nan")
        parts = [f"{self.desc} {self.step}/{self.total}"]
        if scalars:
            parts.append(format_scalars(scalars))
        parts.append(f"{rate:.2f} it/s")
        parts.append(f"ETA {format_eta(eta)}")
        return " | ".join(parts)

    def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> None:
        """Move to iteration ``step`` (absolute) and show ``scalars`` (losses, ``lr``)."""
        if not self.enabled:
            self.step = int(step)
            return
        delta = int(step) - self.step
        self.step = int(step)
        self._updates += 1
        scalars = scalars or {}
        if self._bar is not None:
            if scalars:
                self._bar.set_postfix_str(format_scalars(scalars), refresh=False)
            self._bar.update(delta)
        elif self.text_every > 0 and (self._updates % self.text_every == 0 or self.step >= self.total):
            print(self.line(scalars), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
