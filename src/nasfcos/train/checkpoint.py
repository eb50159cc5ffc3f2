"""Checkpoints that resume exactly and can never run code.

A checkpoint holds the model weights, the optimiser, scheduler and AMP-scaler states, the iteration, a free
``extra`` dict (plain data) and the random-number-generator states (torch CPU and CUDA, NumPy, Python
``random``) so that a resumed run draws the same augmentations as an uninterrupted one. Everything is stored as
tensors and plain Python values, because checkpoints are only ever read with ``torch.load(weights_only=True)``
(:func:`nasfcos.io.safe_torch_load`): a file crafted to execute code on unpickling is refused with a
:class:`~nasfcos.errors.UserError`. Files are written atomically, named ``checkpoint_<step>.pth`` inside a run
folder, and the oldest are rotated away (keep the last ``k``).

DDP- or ``torch.compile``-wrapped models are unwrapped before saving, so the weights load into a plain model
(and a file saved from a wrapped model by other tools, with ``module.`` prefixes, loads too).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nasfcos.errors import UserError
from nasfcos.io import atomic_torch_save, safe_torch_load, strip_common_prefixes

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_path",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "nasfcos-checkpoint"
CHECKPOINT_VERSION = 1
_NAME_RE = re.compile(r"^checkpoint_(\d+)\.pth$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------------------
# Paths and rotation
# --------------------------------------------------------------------------------------------------------------


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """``<directory>/checkpoint_<step, 7 digits>.pth`` — the name :func:`latest_checkpoint` recognises."""
    return Path(directory) / f"checkpoint_{int(step):07d}.pth"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint_<step>.pth`` in ``directory``, oldest step first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (by name, not file time), or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def rotate_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` highest-step checkpoints (``keep_last <= 0`` keeps all); returns deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(directory)
    removed = []
    for _, path in found[: max(0, len(found) - keep_last)]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # another process rotated it already
            pass
    return removed


# --------------------------------------------------------------------------------------------------------------
# RNG states as plain data
# --------------------------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next float | None)
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only when the device count matches)."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if "numpy" in state:
        np_state = state["numpy"]
        keys = np.asarray(np_state["keys"].numpy() if torch.is_tensor(np_state["keys"]) else np_state["keys"],
                          dtype=np.uint32)
        np.random.set_state((np_state["kind"], keys, int(np_state["pos"]), int(np_state["has_gauss"]),
                             float(np_state["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model



def _check_plain(obj: Any, where: str) -> None:
    """Fail early (a bug, not a user error) if ``obj`` holds something ``weights_only`` loading would refuse."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                       torch.Size)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"checkpoint {where}: key {key!r} of type {type(key).__name__} is not plain data")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where}: {type(obj).__name__} cannot be stored (weights_only loading refuses it); "
                    "convert it to tensors, numbers, strings, lists or dicts")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    extra: Mapping[str, Any] | None = None,
    scaler: Any | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a full training checkpoint atomically and return its path.

    ``rng_states``: one :func:`get_rng_state` per rank (gathered by the caller in DDP, e.g. with
    ``distributed.all_gather_object``); default: this process's state only. ``keep_last``: after writing,
    delete all but the newest ``keep_last`` ``checkpoint_<step>.pth`` files in the same folder.
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": dict(extra) if extra is not None else {},
        "rng": list(rng_states) if rng_states is not None else [get_rng_state()],
    }
    _check_plain(payload, "checkpoint")
    target = atomic_torch_save(path, payload)
    if keep_last is not None:
        rotate_checkpoints(target.parent, keep_last)
    return target


def _load_model_state(model: nn.Module, state: Mapping[str, Any], source: Path, strict: bool) -> None:
    target = unwrap_model(model)
    state = strip_common_prefixes(state, _WRAPPER_PREFIXES)
    own = target.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
            raise UserError(f"{source}: checkpoint does not match the model: {'; '.join(parts)}; "
                            "expected a checkpoint of the same architecture and backbone")
    for key, value in state.items():
        if key in own and torch.is_tensor(value) and value.shape != own[key].shape:
            raise UserError(f"{source}: checkpoint does not match the model: '{key}' has shape "
                            f"{tuple(value.shape)} in the file and {tuple(own[key].shape)} in the model")
    target.load_state_dict(state, strict=strict)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into the given objects; returns ``{"step": int, "extra": dict}``.

    A file holding only a model ``state_dict`` (tensors) loads as weights with step 0. The RNG state restored
    is this rank's entry (``torch.distributed`` rank, else 0), falling back to entry 0. Raises ``UserError``
    for a missing, unsafe, foreign or mismatching file.
    """
    source = Path(path)
    data = safe_torch_load(source, what="checkpoint")
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: not a nasfcos checkpoint (got {type(data).__name__}, expected a dict)")
    if data.get("format") != CHECKPOINT_FORMAT:
        if data and all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
            _load_model_state(model, data, source, strict)
            return {"step": 0, "extra": {}}
        raise UserError(f"{source}: not a nasfcos checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry) "
                        "and not a plain state_dict of tensors")
    if int(data.get("version", 0)) > CHECKPOINT_VERSION:
        raise UserError(f"{source}: checkpoint version {data.get('version')} is newer than this nasfcos "
                        f"understands ({CHECKPOINT_VERSION}); upgrade nasfcos")
    _load_model_state(model, data["model"], source, strict)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        state = data.get(name)
        if state is None:
            raise UserError(f"{source}: checkpoint has no {name} state (saved for inference only?); "
                            "resume from a training checkpoint")
        try:
            obj.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{source}: {name} state does not match this run: {exc}") from None
    if restore_rng and data.get("rng"):
        states = data["rng"]
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        set_rng_state(states[rank] if rank < len(states) else states[0])
    return {"step": int(data["step"]), "extra": dict(data.get("extra") or {})}
