"""Process-group helpers for ``torchrun`` training (and the same code path in a single process).

``init_distributed`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). With ``WORLD_SIZE`` unset or 1 nothing is initialised and every helper
below degrades to the single-process answer, so the training loop has one code path. The backend is NCCL on
GPUs and Gloo on the CPU. Reductions return new tensors and leave their input untouched.

Seeding: ``seed_everything(seed, rank)`` seeds Python, NumPy and torch with ``seed + rank`` so that ranks draw
different augmentations; model weights still start identical because DDP broadcasts rank 0's parameters.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nasfcos.errors import UserError
from nasfcos.nn.device import resolve_device

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_dict",
    "resolve_device",
    "seed_everything",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    is_distributed: bool
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes logs, checkpoints and results."""
    return get_rank() == 0


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"environment: {name} is not set; launch multi-process training with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment: {name} must be an integer (got {raw!r})") from None


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by the torchrun environment (or stay single-process).

    Each process uses ``cuda:<LOCAL_RANK>`` on GPUs. Calling it again returns the existing group's info.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = resolve_device(device, local_rank)
        return DistInfo(rank, world_size, local_rank, world_size > 1, dev)
    if world_size <= 1:
        return DistInfo(0, 1, 0, False, resolve_device(device, 0))
    rank = _env_int("RANK", None)
    local_rank = _env_int("LOCAL_RANK", rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"environment: WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
    if not 0 <= rank < world_size:
        raise UserError(f"environment: RANK={rank} is outside 0..{world_size - 1}")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend=chosen, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, True, dev)


def cleanup_distributed() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor; the input is unchanged)."""
    if not is_distributed():
        return tensor.clone()
    result = tensor.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (floating point; a new tensor)."""
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return all_reduce_sum(tensor) / get_world_size()


def reduce_dict(values: Mapping[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Reduce a dict of scalar tensors (losses for logging) in one collective call."""
    if not values:
        return {}
    names = list(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    reduced = all_reduce_mean(stacked) if average else all_reduce_sum(stacked)
    return {name: reduced[i] for i, name in enumerate(names)}


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python ``random``, NumPy and torch (all devices) with ``seed + rank``; returns that seed."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value
