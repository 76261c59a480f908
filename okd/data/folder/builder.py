"""Build the train and val loaders of a class-folder dataset (``folder``, or the ``imagenet``/``tinyimagenet``
presets) from a :class:`~okd.config.DataConfig`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from okd.data.device_loader import split_loader
from okd.data.folder.dataset import FolderDataset
from okd.data.folder.loader import IMAGENET_MEAN, IMAGENET_STD, FolderLoader
from okd.data.folder.presets import PRESETS
from okd.data.folder.samplers import dist_rank_world
from okd.data.folder.scan import FolderSplit, balanced_prefix, scan_train_val
from okd.data.folder.transforms import (
    CenterCropFlipTransform,
    ImageNetTrainTransform,
    ResizeCenterCropTransform,
    TinyTrainTransform,
    _pil,
)
from okd.errors import ConfigError, DataError

log = logging.getLogger("okd")
FOLDER_DATASETS = ("imagenet", "tinyimagenet", "folder")


def image_size_of(data_cfg) -> int:
    """The side of the crops the network sees: the preset's, else ``data.image_size``."""
    preset = PRESETS.get(data_cfg.dataset)
    return preset.image_size if preset is not None else int(data_cfg.image_size)


def geometry(data_cfg) -> tuple[int, int, str]:
    """``(image_size, test resize (shorter side), train_crop)`` of ``data_cfg``."""
    preset = PRESETS.get(data_cfg.dataset)
    if preset is not None:
        return preset.image_size, preset.resize, preset.train_crop
    size = int(data_cfg.image_size)
    resize = int(data_cfg.resize) if data_cfg.resize is not None else int(round(size / 0.875))
    return size, resize, data_cfg.train_crop


def build_transforms(data_cfg, train: bool) -> Callable:
    """The transform of one split: ``data.train_crop`` (train) or resize + centre crop (test)."""
    if data_cfg.dataset not in FOLDER_DATASETS:
        raise DataError(
            f"data.dataset={data_cfg.dataset!r} is not an image-folder dataset ({', '.join(FOLDER_DATASETS)})"
        )
    size, resize, crop = geometry(data_cfg)
    if not train:
        return ResizeCenterCropTransform(resize, size)
    if crop == "random_resized":
        return ImageNetTrainTransform(size, flip=data_cfg.flip)
    if crop == "pad_crop":
        return TinyTrainTransform(size, pad=data_cfg.pad, padding_mode=data_cfg.padding_mode, flip=data_cfg.flip)
    return CenterCropFlipTransform(resize, size, flip=data_cfg.flip)


def scan(dataset: str, root: str | os.PathLike) -> tuple[FolderSplit, FolderSplit]:
    if dataset in PRESETS:
        return PRESETS[dataset].scan(root)
    if dataset == "folder":
        return scan_train_val(root)
    raise DataError(f"data.dataset={dataset!r} is not an image-folder dataset ({', '.join(FOLDER_DATASETS)})")


def split_statistics(split: FolderSplit, transform: Callable, skip_unreadable: bool) -> tuple[list[float], list[float]]:
    """Per-channel mean and std ([0, 1] scale) of ``split`` under the (deterministic) test ``transform``;
    unreadable images fail naming the file, or with ``skip_unreadable`` are left out (counted, the first named),
    as training leaves them out."""
    ds = FolderDataset(split, transform, train=False)
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    skipped: list[str] = []
    for i in range(len(ds)):
        x, _, error = ds[i]
        if x is None:
            if skip_unreadable:
                skipped.append(error)
                continue
            raise DataError(
                f"cannot read image {error} while computing data.compute_stats. Replace or delete it, or set "
                "data.skip_unreadable=true to leave unreadable images out (of the statistics and of training)"
            )
        pixels = x.reshape(3, -1).double().numpy() / 255.0
        total += pixels.sum(axis=1)
        squares += (pixels**2).sum(axis=1)
        count += pixels.shape[1]
    if skipped:
        log.warning(
            f"data.compute_stats: left out {len(skipped)} unreadable image(s) (data.skip_unreadable=true); "
            f"first: {skipped[0]}"
        )
    if count == 0:
        raise DataError(f"data.compute_stats: none of the {len(ds)} training images can be read; first: {skipped[0]}")
    mean = total / count
    std = [round(float(v), 6) for v in np.sqrt(np.maximum(squares / count - mean**2, 0.0))]
    if any(v <= 0 for v in std):  # the rounded value: E[x^2] - E[x]^2 of a constant channel may cancel to ~1e-17
        raise DataError(f"data.compute_stats: a channel of the training images is constant (std {std})")
    return [round(float(v), 6) for v in mean], std


def _statistics(data_cfg, train_split: FolderSplit) -> tuple[list[float], list[float]]:
    if data_cfg.compute_stats:
        transform = build_transforms(data_cfg, train=False)
        mean, std = split_statistics(train_split, transform, data_cfg.skip_unreadable)
        if dist_rank_world()[0] == 0:
            log.info(f"data.compute_stats: training-split mean {mean}, std {std}")
        return mean, std
    mean = list(data_cfg.mean) if data_cfg.mean is not None else list(IMAGENET_MEAN)
    std = list(data_cfg.std) if data_cfg.std is not None else list(IMAGENET_STD)
    if any(s <= 0 for s in std):
        raise DataError(f"data.std must be positive, got {std}")
    return mean, std


def preprocessing(data_cfg) -> tuple[list[str], list[float], list[float]]:
    """``(class names, mean, std)`` a run on ``data_cfg`` uses, without building its loaders."""
    train_split, _ = scan(data_cfg.dataset, data_cfg.root)
    if data_cfg.limit_train is not None:
        train_split = train_split.subset(balanced_prefix(train_split.labels, data_cfg.limit_train))
    mean, std = _statistics(data_cfg, train_split)
    return list(train_split.classes), mean, std


def decode_split(split: FolderSplit, transform: Callable, skip_unreadable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``split`` through the deterministic ``transform``: ``(uint8 N x 3 x S x S, labels)``."""
    ds = FolderDataset(split, transform, train=False)
    images, labels, skipped = [], [], []
    for i in range(len(ds)):
        x, y, error = ds[i]
        if x is None:
            if not skip_unreadable:
                raise DataError(
                    f"cannot read image {error}. Replace or delete it, or set data.skip_unreadable=true to leave "
                    "unreadable images out"
                )
            skipped.append(error)
            continue
        images.append(x)
        labels.append(y)
    if skipped:
        log.warning(f"left out {len(skipped)} unreadable image(s) (data.skip_unreadable=true); first: {skipped[0]}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def in_memory_loaders(data_cfg, train_split, test_split, mean, std, seed, device, views):
    """``data.in_memory``: both splits decoded once at ``image_size`` and served by :class:`DeviceLoader`
    (augmentation on the device: ``pad_crop`` pads by ``data.pad`` and crops, ``center`` only flips).

    Training images are Resize(image_size) -> CenterCrop(image_size) (``pad_crop``) or the test transform
    (``center``); so for square images ``pad_crop`` draws the same crops as the streaming path (not the same
    random numbers), and for non-square ones only from the central square.
    """
    size, resize, crop = geometry(data_cfg)
    if crop == "random_resized":
        raise ConfigError(
            "data.in_memory=true keeps the images decoded at data.image_size, so it needs data.train_crop=pad_crop "
            "or center (random_resized crops the original images)"
        )
    train_decode = ResizeCenterCropTransform(size if crop == "pad_crop" else resize, size)
    loaders = []
    for train, split, decode in (
        (True, train_split, train_decode),
        (False, test_split, build_transforms(data_cfg, train=False)),
    ):
        images, labels = decode_split(split, decode, data_cfg.skip_unreadable)
        pad = data_cfg.pad if crop == "pad_crop" else 0
        loader = split_loader(
            images, labels, data_cfg, train=train, mean=mean, std=std, seed=seed, views=views, device=device, pad=pad
        )
        loaders.append(loader)
    if dist_rank_world()[0] == 0:
        mib = sum(x.images.numel() for x in loaders) / 2**20
        log.info(f"data.in_memory: {mib:.1f} MiB of uint8 images on {loaders[0].device}")
    return loaders[0], loaders[1]


def build_folder_loaders(
    data_cfg,
    seed: int,
    device: torch.device | str | None,
    views: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[FolderLoader, FolderLoader, int, list[str]]:
    """``(train_loader, test_loader, num_classes, class_names)`` for a class-folder dataset.

    ``data.batch_size``/``test_batch_size`` are global batches, sharded over ``rank``/``world_size``
    (default: the initialised process group; see :meth:`FolderLoader.shard`). ``limit_train`` /
    ``limit_test`` keep that many images, round-robin over classes (:func:`balanced_prefix`).
    """
    _pil()
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = dist_rank_world()
    train_split, test_split = scan(data_cfg.dataset, data_cfg.root)
    if data_cfg.limit_train is not None:
        train_split = train_split.subset(balanced_prefix(train_split.labels, data_cfg.limit_train))
    if data_cfg.limit_test is not None:
        test_split = test_split.subset(balanced_prefix(test_split.labels, data_cfg.limit_test))
    mean, std = _statistics(data_cfg, train_split)
    if data_cfg.in_memory:
        train, test = in_memory_loaders(data_cfg, train_split, test_split, mean, std, seed, device, views)
        return train, test, len(train_split.classes), list(train_split.classes)
    loaders = []
    for train, split in ((True, train_split), (False, test_split)):
        transform = build_transforms(data_cfg, train)
        ds = FolderDataset(split, transform, train=train, seed=seed, views=views if train else 1)
        loader = FolderLoader(
            ds,
            data_cfg.batch_size if train else data_cfg.test_batch_size,
            mean=mean,
            std=std,
            drop_last=data_cfg.drop_last and train,
            workers=data_cfg.workers,
            pin_memory=data_cfg.pin_memory,
            device=device,
            rank=rank,
            world_size=world_size,
            skip_unreadable=data_cfg.skip_unreadable,
            name=f"{data_cfg.dataset} {'train' if train else 'val'}",
        )
        if train and len(loader) == 0:
            raise DataError(
                f"the training split has {len(split)} images ({len(loader.sampler)} on each of {world_size} "
                f"rank(s)), fewer than one batch of {loader.rank_batch_size} per rank with data.drop_last=true; "
                "lower data.batch_size, raise data.limit_train or set data.drop_last=false."
            )
        loaders.append(loader)
    return loaders[0], loaders[1], len(train_split.classes), list(train_split.classes)
