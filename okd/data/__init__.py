"""CIFAR data: the official-format reader/downloader and the device-resident loader."""

from okd.data.builder import build_loaders
from okd.data.cifar import DATASET_STATS, SPECS, CifarSplit, download_cifar, load_cifar
from okd.data.device_loader import DeviceLoader

__all__ = [
    "DATASET_STATS",
    "SPECS",
    "CifarSplit",
    "DeviceLoader",
    "build_loaders",
    "download_cifar",
    "load_cifar",
]
