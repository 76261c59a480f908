"""Samplers of the folder loader: exact evaluation shards and (epoch, index) tagging."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Exact evaluation sharding: ``range(rank, n, world)``, in order, no padding, no drop."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every index of ``base``; ``epoch`` is read when iteration starts."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base, self.epoch = base, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
