"""FolderLoader: device batches of a FolderDataset with DeviceLoader's interface, sharded under torch.distributed."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from okd.data.folder.dataset import FolderDataset, collate_samples
from okd.data.folder.samplers import EpochTaggedSampler, ShardSampler, dist_rank_world
from okd.errors import ConfigError, DataError

log = logging.getLogger("okd")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_DEFAULT_WORKERS = 8


def default_workers(cores: int | None = None) -> int:
    """``data.workers`` left unset: min(8, cores - 1) DataLoader workers, one core kept for the training process
    (0, loading in the training process itself, on a single core). ``cores``: the usable cores (affinity mask)."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            cores = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))


class FolderLoader:
    """Batches of ``(x, y)`` on ``device`` from a :class:`FolderDataset`, with DeviceLoader's interface.

    ``set_epoch(e)`` selects the pass (then each pass advances it by one); ``x`` is float32 normalised with
    ``mean``/``std`` ([0, 1] scale), channels-last if ``channels_last``; with ``views > 1`` (training) a
    list of independent augmentations.

    ``batch_size`` is the global batch, as DeviceLoader's. :meth:`shard` (default: the initialised process
    group, else rank 0 of 1) makes this rank load ``batch_size / world_size`` images per training batch
    (must divide) and ``ceil(batch_size / world_size)`` per test batch; ``len()`` is this rank's batch count.
    Unreadable images raise :class:`DataError` with their path, or, with ``skip_unreadable``, are left out
    of their batch and counted (``skipped``; logged once per pass).
    """

    def __init__(
        self,
        dataset: FolderDataset,
        batch_size: int,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_last: bool = False,
        workers: int | None = 0,
        pin_memory: bool = True,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        skip_unreadable: bool = False,
        name: str = "",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.dataset, self.batch_size, self.train = dataset, int(batch_size), dataset.train
        self.views = dataset.views
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.channels_last, self.skip_unreadable = channels_last, bool(skip_unreadable)
        self.drop_last, self.workers = (
            bool(drop_last) and self.train,
            default_workers() if workers is None else int(workers),
        )
        self._pin = bool(pin_memory) and self.device.type == "cuda"
        self.name = name or ("train" if self.train else "test")
        self.epoch, self.skipped = 0, 0
        #: leave out training batches of a single image (set by the trainer for networks with BatchNorm:
        #: :func:`okd.engine.last_batch.drop_single_image_batches`)
        self.drop_single = False
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self.rank = self.world_size = -1
        self.shard(*((rank, world_size) if rank is not None else dist_rank_world()))

    def shard(self, rank: int, world_size: int) -> None:
        """Load only rank ``rank``'s share of every pass (idempotent; rebuilds the DataLoader on a change).

        Training: ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle=True, seed,
        drop_last=True)``: one permutation per epoch for all ranks, rank r takes positions r::world_size, so
        rank r's b-th batch is positions r::world_size of the single-process b-th global batch; every rank
        has the same number of batches (up to world_size - 1 tail images are left out of a pass).
        Evaluation: :class:`ShardSampler` (``indices[rank::world_size]``, no padding): every image is
        evaluated exactly once across ranks; ranks may differ by one image (and so by one batch).
        """
        rank, world_size = int(rank), int(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if (rank, world_size) == (self.rank, self.world_size):
            return
        if self.train and self.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by the "
                f"{world_size} processes; choose a multiple of {world_size}"
            )
        self.rank, self.world_size = rank, world_size
        self.rank_batch_size = self.batch_size // world_size if self.train else math.ceil(self.batch_size / world_size)
        if self.train:
            self.sampler: Sampler[int] = DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.dataset.seed, drop_last=True
            )
        else:
            self.sampler = ShardSampler(len(self.dataset), rank, world_size)
        self._tagged = EpochTaggedSampler(self.sampler)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.rank_batch_size,
            sampler=self._tagged,
            num_workers=self.workers,
            collate_fn=collate_samples,
            pin_memory=self._pin,
            drop_last=self.drop_last,
            persistent_workers=self.workers > 0,
        )

    def __len__(self) -> int:
        return len(self.loader) - int(self.drop_single and self.single_image_tail())

    def single_image_tail(self) -> bool:
        """Whether the last training batch of this rank holds exactly one image (every rank holds as many)."""
        return self.train and not self.drop_last and len(self.sampler) % self.rank_batch_size == 1

    @property
    def num_samples(self) -> int:
        """Images this rank sees per pass (after sharding and ``drop_last``; before skipping)."""
        return min(len(self) * self.rank_batch_size, len(self.sampler))

    @property
    def dataset_size(self) -> int:
        """Images in the whole split (all ranks)."""
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self._shift, x.float(), self._scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        self._tagged.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        skipped, first, singles = 0, "", 0
        batches = len(self)
        for b, (xb, yb, errors) in enumerate(self.loader):
            if b == batches:
                break  # the last batch of one image, left out (drop_single)
            if errors:
                if not self.skip_unreadable:
                    raise DataError(
                        f"cannot read image {errors[0]}. Replace or delete it, or set data.skip_unreadable=true "
                        "to leave unreadable images out (they are counted and logged)"
                    )
                skipped += len(errors)
                self.skipped += len(errors)
                first = first or errors[0]
            if yb.numel() == 0:
                continue
            if self.drop_single and yb.numel() == 1 and errors:  # unreadable images shrank it to one image
                if self.world_size > 1:  # skipping it here alone would leave the other processes waiting
                    raise DataError(
                        f"a training batch on rank {self.rank} holds a single readable image once unreadable ones "
                        f"are left out (first: {errors[0]}); the network's BatchNorm layers cannot train on one "
                        "image. Replace or delete the unreadable images"
                    )
                singles += 1
                continue
            x = xb.to(self.device, non_blocking=self._pin)
            y = yb.to(self.device, non_blocking=self._pin)
            if x.ndim == 5:
                yield [self.normalize(x[:, v]) for v in range(x.shape[1])], y
            elif self.views > 1:
                xn = self.normalize(x)
                yield [xn] * self.views, y
            else:
                yield self.normalize(x), y
        if skipped:
            log.warning(
                f"{self.name}: skipped {skipped} unreadable image(s) in this pass on rank {self.rank} "
                f"(data.skip_unreadable=true); first: {first}"
                + (f"; {singles} batch(es) left with a single image were left out" if singles else "")
            )
