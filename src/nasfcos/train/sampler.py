"""An epoch-seeded, rank-sharded batch sampler that can start in the middle of an epoch.

Resuming an iteration-based run must continue with exactly the batches that were not yet seen. The order of
epoch ``e`` is a permutation drawn from ``seed + e``; rank ``r`` of ``W`` takes every ``W``-th index; a resumed
run skips the first ``start_batch`` batches of its starting epoch without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one epoch; call :meth:`set_epoch` before iterating each epoch."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_items <= 0:
            raise ValueError("EpochBatchSampler: the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"EpochBatchSampler: batch_size must be positive (got {batch_size})")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        per_rank = -(-self.num_items // self.world_size)
        order = (order * (1 + per_rank * self.world_size // max(1, len(order))))[: per_rank * self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = -(-self.num_items // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for number in range(self.start_batch, len(self)):
            batch = indices[number * self.batch_size : (number + 1) * self.batch_size]
            if batch:
                yield batch
