"""Build the train and test loaders of a run from its :class:`~okd.config.DataConfig`."""

from __future__ import annotations

import torch

from okd.config import DataConfig
from okd.data.cifar import DATASET_STATS, get_spec, load_cifar
from okd.data.device_loader import DeviceLoader, split_loader
from okd.data.folder import FOLDER_DATASETS, FolderLoader, build_folder_loaders
from okd.errors import DataError


def build_loaders(
    data_cfg: DataConfig, seed: int, device: torch.device | str | None, views: int = 1, view_augs=None
) -> tuple[DeviceLoader | FolderLoader, DeviceLoader | FolderLoader, int, list[str]]:
    """Load (or download) the dataset and return ``(train_loader, test_loader, num_classes, class_names)``.

    ``limit_train``/``limit_test`` keep the first N images; mean/std default to the dataset's standard
    statistics; ``padding_mode='zeros'`` pads with raw pixel value 0 (before normalisation), as
    torchvision's ``RandomCrop(32, padding=4)`` does. ``imagenet``/``tinyimagenet`` are image folders read by
    :func:`okd.data.folder.build_folder_loaders` (DataLoader workers, sharded under torch.distributed).
    ``view_augs`` names each training view's augmentation (:mod:`okd.data.views`; CIFAR only).
    """
    if data_cfg.dataset in FOLDER_DATASETS:
        if view_augs is not None:
            raise DataError(
                f"named per-view augmentations ({', '.join(view_augs)}) are implemented for CIFAR only, not for "
                f"data.dataset={data_cfg.dataset}; leave the method's views out to give every view the standard crop"
            )
        return build_folder_loaders(data_cfg, seed, device, views)
    spec = get_spec(data_cfg.dataset)
    default_mean, default_std = DATASET_STATS[spec.name]
    mean = list(data_cfg.mean) if data_cfg.mean is not None else list(default_mean)
    std = list(data_cfg.std) if data_cfg.std is not None else list(default_std)
    if any(s <= 0 for s in std):
        raise DataError(f"data.std must be positive, got {std}")
    loaders = []
    classes: list[str] = []
    for train, limit in ((True, data_cfg.limit_train), (False, data_cfg.limit_test)):
        split = load_cifar(data_cfg.root, spec.name, train=train, download=data_cfg.download)
        classes = split.classes
        images, labels = split.images, split.labels
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        loader = split_loader(
            torch.from_numpy(images), torch.from_numpy(labels), data_cfg, train=train, mean=mean, std=std,
            seed=seed, views=views, device=device, view_augs=view_augs,
        )  # fmt: skip
        loaders.append(loader)
    return loaders[0], loaders[1], spec.num_classes, classes
