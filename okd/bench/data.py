"""The training split both paths read and the loaders over it (the okd DeviceLoader, the reference DataLoader)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from okd.config import Config
from okd.data import build_loaders
from okd.data.cifar import DATASET_STATS, get_spec
from okd.data.device_loader import DeviceLoader
from okd.errors import DataError, OKDError


@dataclass
class Split:
    """The uint8 training split both paths read, and where it came from."""

    images: Tensor  # uint8 N x 3 x 32 x 32, CPU
    labels: Tensor  # int64 N, CPU
    mean: list[float]
    std: list[float]
    kind: str  # "real" | "synthetic"
    reason: str = ""


def load_split(cfg: Config, min_images: int, synthetic: bool = False) -> Split:
    """The config's training split (never downloaded: ``build_loaders`` with ``download=false``), or synthetic
    uniform uint8 images of CIFAR shape with the dataset's class count when it is absent or ``synthetic``."""

    data = cfg.run.data
    if data.dataset not in DATASET_STATS:
        raise OKDError(f"okd bench times CIFAR configs (cifar10, cifar100); data.dataset={data.dataset!r}")
    spec = get_spec(data.dataset)
    mean = list(data.mean) if data.mean is not None else list(DATASET_STATS[spec.name][0])
    std = list(data.std) if data.std is not None else list(DATASET_STATS[spec.name][1])
    reason = "asked for (--synthetic)"
    if not synthetic:
        try:
            no_download = dataclasses.replace(data, download=False, drop_last=True)
            loader = build_loaders(no_download, cfg.run.seed, "cpu")[0]
            return Split(loader.images, loader.labels, mean, std, "real")
        except DataError as exc:
            reason = f"{data.dataset} not found under data.root={data.root!r} ({str(exc).split(':')[0]})"
    n = max(min_images, data.batch_size)
    if data.limit_train is not None:
        n = max(min(n, data.limit_train), data.batch_size)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    return Split(images, labels, mean, std, "synthetic", reason)


def okd_loader(split: Split, cfg: Config, device: torch.device, views: int) -> DeviceLoader:
    """The trainer's device-resident loader over ``split`` (full batches only)."""
    d, t = cfg.run.data, cfg.run.train
    return DeviceLoader(
        split.images, split.labels, d.batch_size, mean=split.mean, std=split.std, train=True, pad=d.pad,
        padding_mode=d.padding_mode, flip=d.flip, shuffle=True, drop_last=True, seed=cfg.run.seed, views=views,
        device=device, channels_last=t.channels_last,
    )  # fmt: skip


class ReferenceDataset(torch.utils.data.Dataset):
    """CPU dataset with the standard per-sample transforms, in torch: Pad(reflect|zeros) -> RandomCrop ->
    RandomHorizontalFlip on the uint8 image, then ToTensor (/255) and Normalize; ``views`` draws per image."""

    def __init__(self, split: Split, pad: int, padding_mode: str, flip: bool, views: int = 1) -> None:
        self.images, self.labels = split.images, split.labels
        self.mean = torch.tensor(split.mean).view(3, 1, 1)
        self.std = torch.tensor(split.std).view(3, 1, 1)
        self.pad, self.mode, self.flip, self.views = pad, padding_mode, flip, views

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, img: Tensor) -> Tensor:
        c, h, w = img.shape
        x = img
        if self.pad:
            p = self.pad
            if self.mode == "reflect":  # reflection padding needs a float input
                x = F.pad(x.unsqueeze(0).float(), (p, p, p, p), mode="reflect").squeeze(0)
            else:
                x = F.pad(x, (p, p, p, p))
        i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return ((x.float() / 255.0 - self.mean) / self.std).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor | list[Tensor], Tensor]:
        img = self.images[index]
        xs = [self.transform(img) for _ in range(self.views)]
        return (xs[0] if self.views == 1 else xs), self.labels[index]


def reference_loader(split: Split, cfg: Config, device: torch.device, views: int, workers: int):
    """``torch.utils.data.DataLoader`` as the reference trainers use it (shuffle, workers, pinned on a GPU)."""
    d = cfg.run.data
    dataset = ReferenceDataset(split, d.pad, d.padding_mode, d.flip, views)
    return torch.utils.data.DataLoader(
        dataset, batch_size=d.batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.run.seed),
    )  # fmt: skip


def cycle_device(loader: DeviceLoader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def cycle_reference(loader, device: torch.device) -> Iterator:
    def move(x):
        return [v.to(device, non_blocking=True) for v in x] if isinstance(x, list) else x.to(device, non_blocking=True)

    while True:
        for x, y in loader:
            yield move(x), y.to(device, non_blocking=True)


def num_classes_of(cfg: Config) -> int:
    return get_spec(cfg.run.data.dataset).num_classes
