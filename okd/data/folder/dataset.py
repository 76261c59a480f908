"""The folder dataset: decodes images with Pillow in DataLoader workers and applies a transform."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from okd.data.folder.scan import FolderSplit
from okd.data.folder.transforms import _pil, sample_generator


class FolderDataset(Dataset):
    """Decodes ``split`` with Pillow and applies ``transform`` ``views`` times.

    Indexed by ``(epoch, index)`` (see :class:`EpochTaggedSampler`), so workers need no epoch state.
    Returns ``(uint8 tensor C x H x W, or views x C x H x W; label; None)``, or ``(None, label, 'path: error')``
    for an unreadable image (the loader decides whether to fail or skip).
    """

    def __init__(self, split: FolderSplit, transform: Callable, *, train: bool, seed: int = 0, views: int = 1):
        self.split, self.transform, self.train = split, transform, bool(train)
        self.seed, self.views = int(seed), int(views)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int):
        image = _pil()
        with image.open(self.split.path(index)) as img:
            return img.convert("RGB")

    def __getitem__(self, key: tuple[int, int] | int):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        label = int(self.split.labels[index])
        try:
            img = self.load(index)
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            return None, label, f"{self.split.path(index)}: {type(exc).__name__}: {reason}"
        rng = sample_generator(self.seed, epoch, index) if self.train else None
        arrs = [self.transform(img, rng) for _ in range(self.views if self.train else 1)]
        tensors = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrs]
        return (tensors[0] if len(tensors) == 1 else torch.stack(tensors)), label, None


def collate_samples(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable samples; return ``(x uint8, y int64, errors)``."""
    good = [it for it in items if it[0] is not None]
    errors = [it[2] for it in items if it[0] is None]
    x = torch.stack([g[0] for g in good]) if good else torch.empty(0, dtype=torch.uint8)
    y = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return x, y, errors
