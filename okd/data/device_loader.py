"""A loader that keeps a whole uint8 split on the device and augments batches with tensor ops.

Training batches get the standard CIFAR recipe (pad-``pad`` random crop, horizontal flip with
probability 1/2, normalisation), the same distribution as torchvision's ``RandomCrop(32, padding=4,
padding_mode=...)`` + ``RandomHorizontalFlip()`` + ``Normalize``; crop and flip are one gather.

With ``m_per_class`` the training order is MCL's class-balanced sampler (``m_per_class_order``) instead of a
shuffled pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from okd.data.autoaugment import auto_augment
from okd.data.randaugment import rand_augment
from okd.data.views import VIEW_KINDS, check_view_names, cutout, rotate_nearest, view_draws
from okd.errors import DataError

PADDING_MODES = ("reflect", "zeros")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state is a pure function of ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x0CD]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def m_per_class_order(
    labels: torch.Tensor, m: int, batch_size: int, batches: int, gen: torch.Generator
) -> torch.Tensor:
    """MCL's MPerClassSampler: ``batches`` independent batches of ``batch_size // m`` classes x ``m`` images.

    For each batch: a random permutation of the classes present, the first ``batch_size // m`` of them, and for
    each ``m`` distinct images of that class (with replacement only when the class has fewer than ``m``),
    laid out class by class ``[c1] * m + [c2] * m + ...``. Batches are drawn independently, so a pass repeats
    some images and misses others (not an epoch permutation). Returns CPU indices, ``batches * batch_size``.
    """
    labels = labels.cpu()
    classes, counts = labels.unique(return_counts=True)
    k = batch_size // m
    if k > len(classes):
        raise ValueError(
            f"a batch of {batch_size} with {m} images per class needs {k} classes, the split has {len(classes)}"
        )
    by_class = labels.argsort(stable=True)  # indices grouped by class, in class order
    starts = torch.cumsum(counts, 0) - counts
    chosen = torch.rand(batches, len(classes), generator=gen).argsort(dim=1)[:, :k]  # a class permutation per batch
    n = counts[chosen]
    # m distinct positions in [0, n): draw r in [0, n - j), then step it past the earlier picks in ascending order
    picked = torch.empty(batches, k, 0, dtype=torch.int64)
    for j in range(m):
        r = (torch.rand(batches, k, generator=gen) * (n - j).clamp_min(1)).long()
        for t in range(j):
            r = r + (r >= picked[..., t]).long()
        picked = torch.cat([picked, r.unsqueeze(-1)], dim=-1).sort(dim=-1).values
    if m > 1:  # in random order within the class, not sorted
        picked = picked.gather(-1, torch.rand(batches, k, m, generator=gen).argsort(dim=-1))
    short = n < m  # fewer than m images: draw with replacement
    if bool(short.any()):
        repl = (torch.rand(batches, k, m, generator=gen) * n.unsqueeze(-1)).long()
        picked = torch.where(short.unsqueeze(-1), repl, picked)
    return by_class[starts[chosen].unsqueeze(-1) + picked].view(-1)


def _source_index(pos: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Map unpadded coordinates (any range) to valid indices; also return the in-range mask."""
    valid = (pos >= 0) & (pos < size)
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos >= size, 2 * (size - 1) - pos, pos)
    else:
        pos = pos.clamp(0, size - 1)
    return pos, valid


class DeviceLoader:
    """Batches of ``(x, y)`` from a uint8 N x 3 x H x W split held on ``device``.

    ``x`` is ``dtype`` (float32) normalised with ``mean``/``std`` (given on the [0, 1] scale). With
    ``train`` the order is shuffled (if ``shuffle``) and each sample gets an independent crop offset,
    uniform over the (2*pad+1)^2 grid, and a flip with probability 1/2 (if ``flip``); with ``views > 1``
    ``x`` is a list of ``views`` independent draws of the same images. Without ``train`` the split comes
    in order, normalised only. Each pass uses the epoch set by :meth:`set_epoch` (then advances it by
    one), and all of its draws are a pure function of ``(seed, epoch)``, so resuming needs no RNG state.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        pad: int = 4,
        padding_mode: str = "reflect",
        flip: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        views: int = 1,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        m_per_class: int = 0,
        view_augs: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if batch_size <= 0 or views <= 0 or pad < 0:
            raise ValueError("batch_size and views must be positive and pad non-negative")
        if view_augs is not None:
            check_view_names(view_augs, "view_augs")
            if len(view_augs) != views:
                raise ValueError(f"view_augs names {len(view_augs)} views, but the loader makes {views}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        c, h, w = images.shape[1:]
        if padding_mode == "reflect" and pad >= min(h, w):
            raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values each")
        if m_per_class < 0 or (m_per_class and (not train or batch_size % m_per_class)):
            raise ValueError(f"m_per_class={m_per_class} needs a training split and must divide batch_size")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.views = int(batch_size), bool(train), int(views)
        self.pad, self.padding_mode, self.flip = int(pad), padding_mode, bool(flip)
        self.shuffle, self.drop_last, self.seed = bool(shuffle) and self.train, bool(drop_last), int(seed)
        self.channels_last, self.dtype = channels_last, dtype
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # (x / 255 - mean) / std == x * scale + shift
        self._shift = -mean_t / std_t
        self.m_per_class = int(m_per_class)
        self.epoch = 0
        self._views = range(self.views)
        #: per-view kinds (okd.data.views); None: every view is the standard crop + flip
        self.view_kinds = None if view_augs is None else [VIEW_KINDS[name] for name in view_augs]
        self.rank, self.world_size = 0, 1
        #: leave out a last training batch that gives some rank a single image (set by the trainer for
        #: networks with BatchNorm: :func:`okd.engine.last_batch.drop_single_image_batches`)
        self.drop_single = False

    def shard(self, rank: int, world_size: int) -> None:
        """Distributed use: yield only this rank's part (positions rank::world_size) of every global batch.

        Shuffling and augmentation draws are made for the whole global batch first, so the union of the
        ranks' shards is exactly the single-process batch, and every test sample is seen exactly once. With
        ``m_per_class`` a rank takes a contiguous slice of ``batch_size / world_size`` positions instead, so
        that every class it holds keeps its ``m`` images (``batch_size`` must divide into whole classes).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if self.m_per_class and self.batch_size % (world_size * self.m_per_class):
            raise DataError(
                f"data.sampler=m_per_class shards each batch of {self.batch_size} into {world_size} equal parts "
                f"of whole classes, so data.batch_size must be a multiple of world size x data.m_per_class "
                f"({world_size} x {self.m_per_class})"
            )
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.m_per_class:
            return n // self.batch_size  # the sampler's pass: no partial batch
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size) - int(self.drop_single and self.single_image_tail())

    def single_image_tail(self) -> bool:
        """Whether the last batch of a pass (without ``drop_last``) gives some rank exactly one image (the
        same answer on every rank)."""
        n = len(self.labels)
        if self.m_per_class or self.drop_last:
            return False  # every batch is full
        tail = n - (math.ceil(n / self.batch_size) - 1) * self.batch_size if n else 0
        return self.train and any(len(range(k, tail, self.world_size)) == 1 for k in range(self.world_size))

    @property
    def num_samples(self) -> int:
        """Images seen per pass (after ``drop_last``)."""
        return min(len(self) * self.batch_size, len(self.labels))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _draws(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (views x n x 2, in [0, 2*pad]) and flip flags (views x n), drawn on the CPU."""
        offsets = torch.randint(0, 2 * self.pad + 1, (self.views, n, 2), generator=gen)
        flips = torch.randint(0, 2, (self.views, n), generator=gen).bool()
        if not self.flip:
            flips.zero_()
        return offsets.to(self.device), flips.to(self.device)

    def augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop (offsets b x 2, into the padded image) and flip (b) a uint8 batch in one gather."""
        b, c, h, w = x.shape
        p = self.pad
        rows = torch.arange(h, device=x.device).view(1, h) + (offsets[:, :1] - p)
        cols = torch.arange(w, device=x.device).view(1, w)
        cols = torch.where(flips.view(b, 1), w - 1 - cols, cols) + (offsets[:, 1:] - p)
        rows, row_ok = _source_index(rows, h, self.padding_mode)
        cols, col_ok = _source_index(cols, w, self.padding_mode)
        index = (rows.view(b, h, 1) * w + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
        out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
        if self.padding_mode == "zeros" and p > 0:
            out = out * (row_ok.view(b, 1, h, 1) & col_ok.view(b, 1, 1, w))
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self._shift, x.float(), self._scale).to(self.dtype)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        n = len(self.labels)
        gen = epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        if self.m_per_class:
            order = m_per_class_order(self.labels, self.m_per_class, self.batch_size, len(self), gen).to(self.device)
            n = len(order)
        else:
            order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        if self.train:
            offsets, flips = self._draws(gen, n)
            if self.view_kinds is not None:
                draws = {k: v.to(self.device) for k, v in view_draws(gen, self.views, n, self.images.shape[2:]).items()}
        per_rank = self.batch_size // self.world_size
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if self.m_per_class:  # contiguous: whole classes per rank
                mine = slice(lo + self.rank * per_rank, lo + (self.rank + 1) * per_rank)
            else:
                mine = slice(lo + self.rank, hi, self.world_size)
            if order is None:
                xb, yb = self.images[mine], self.labels[mine]
            else:
                idx = order[mine]
                xb, yb = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if not self.train:
                x = self.normalize(xb)
                yield (x if self.views == 1 else [x] * self.views), yb
                continue
            if self.view_kinds is None:
                xs = [self.normalize(self.augment(xb, offsets[v, mine], flips[v, mine])) for v in self._views]
            else:
                xs = [self.normalize(self._named_view(xb, v, offsets, flips, draws, mine)) for v in self._views]
            yield (xs[0] if self.views == 1 else xs), yb

    def _named_view(self, xb, v: int, offsets, flips, draws: dict, mine: slice) -> torch.Tensor:
        """View ``v`` of a uint8 batch as its named kind makes it (crop, flip, then rotation, cutout or
        RandAugment or AutoAugment)."""
        kind = self.view_kinds[v]
        off, flip = offsets[v, mine], flips[v, mine]
        if not kind.crop:
            off = torch.full_like(off, self.pad)
        if not kind.flip:
            flip = torch.zeros_like(flip)
        x = self.augment(xb, off, flip)
        if kind.rotate:
            x = rotate_nearest(x, draws["angles"][v, mine] * kind.rotate)
        if kind.cutout:
            x = cutout(x, draws["centres"][v, mine], kind.cutout)
        if kind.randaugment:
            x = rand_augment(x, draws["ops"][v, mine], draws["negative"][v, mine])
        if kind.autoaugment:
            x = auto_augment(x, draws["policy"][v, mine], draws["probs"][v, mine], draws["policy_negative"][v, mine])
        return x


def split_holdout(loader: DeviceLoader, n: int) -> tuple[DeviceLoader, DeviceLoader]:
    """Withhold the last ``n`` images of a training loader as an un-augmented, unshuffled held-out loader."""
    if not 0 < n < len(loader.labels):
        raise ValueError(f"holdout of {n} images needs 0 < n < {len(loader.labels)} training images")
    train, held = copy.copy(loader), copy.copy(loader)
    train.images, train.labels = loader.images[:-n], loader.labels[:-n]
    held.images, held.labels = loader.images[-n:], loader.labels[-n:]
    held.train, held.shuffle, held.views, held._views, held.drop_last = False, False, 1, range(1), False
    held.m_per_class = 0
    held.view_kinds = None
    return train, held


def split_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    data_cfg,
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    views: int,
    device: torch.device | str | None,
    pad: int | None = None,
    view_augs: Sequence[str] | None = None,
) -> DeviceLoader:
    """The :class:`DeviceLoader` of one split with the settings of ``data_cfg`` (a ``DataConfig``; ``pad``
    overrides ``data.pad``); a training split smaller than one batch under ``drop_last`` is a ``DataError``."""
    loader = DeviceLoader(
        images,
        labels,
        data_cfg.batch_size if train else data_cfg.test_batch_size,
        mean=mean,
        std=std,
        train=train,
        pad=data_cfg.pad if pad is None else pad,
        padding_mode=data_cfg.padding_mode,
        flip=data_cfg.flip,
        shuffle=train,
        drop_last=data_cfg.drop_last and train,
        seed=seed,
        views=views if train else 1,
        device=device,
        m_per_class=data_cfg.m_per_class if train and data_cfg.sampler == "m_per_class" else 0,
        view_augs=view_augs if train else None,
    )
    if loader.m_per_class:
        classes, k = len(labels.unique()), loader.batch_size // loader.m_per_class
        if k > classes:
            raise DataError(
                f"data.sampler=m_per_class draws data.batch_size / data.m_per_class = {k} classes per batch, but "
                f"the training split has {classes}; lower data.batch_size or raise data.m_per_class"
            )
    if len(loader) == 0:
        raise DataError(
            f"the {'training' if train else 'test'} split has {len(labels)} images, fewer than one "
            f"batch of {loader.batch_size} with data.drop_last=true or data.sampler=m_per_class; lower "
            f"data.batch_size, raise data.limit_train or set data.drop_last=false."
        )
    return loader
