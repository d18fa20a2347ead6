"""Data order: batches whose order is a pure function of (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) keys whose order is a pure function of (seed, epoch).

    `set_epoch(epoch, skip=n)` starts the epoch at batch n: this is how a run resumed mid-epoch
    continues with exactly the batches the uninterrupted run would have used. Under
    torch.distributed each rank takes its own shard of every epoch's permutation.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            indices = torch.randperm(self.size, generator=gen).tolist()
        else:
            indices = list(range(self.size))
        if self.world_size > 1:
            per_rank = math.ceil(self.size / self.world_size)
            indices = (indices * 2)[: per_rank * self.world_size]
            indices = indices[self.rank :: self.world_size]
        return indices

    @property
    def batches_per_epoch(self) -> int:
        n = math.ceil(self.size / self.world_size)
        if self.drop_last or self._lone_last(n):
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def _lone_last(self, n: int) -> bool:
        """A last batch of one sample joins the batch before it: BatchNorm cannot train on one."""
        return n > self.batch_size and n % self.batch_size == 1

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.order(self.epoch)
        batches = self.batches_per_epoch
        for b in range(self.skip, batches):
            end = len(indices) if b == batches - 1 and self._lone_last(len(indices)) else (b + 1) * self.batch_size
            yield [(self.epoch, i) for i in indices[b * self.batch_size : end]]
