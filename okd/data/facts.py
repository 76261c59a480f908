"""What okd knows of each data set beyond its files: class names, input geometry, normalisation statistics."""

from __future__ import annotations

from okd.config import DataConfig
from okd.data.cifar import CIFAR10_CLASSES, DATASET_STATS, load_cifar
from okd.data.folder import geometry
from okd.errors import OKDError

CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


#: ImageNet-style folders (``okd.data.folder``): classes when the run folder cannot tell, input size and the
#: shorter side images are resized to before the centre crop (ImageNet's test recipe: 256 then 224)
FOLDER_DATASETS = {"imagenet": (1000, 224, 256), "tinyimagenet": (200, 64, 64)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_geometry(dataset: str | None, data: dict | None = None) -> tuple[int, int | None]:
    """``(size, shorter side before the centre crop)``; CIFAR: (32, None), i.e. a plain resize to 32x32;
    ``folder``: from the run's ``data`` section (``data.image_size``, ``data.resize``)."""
    if dataset == "folder":
        known = {k: v for k, v in (data or {}).items() if k in ("dataset", "image_size", "resize", "train_crop")}
        return geometry(DataConfig(**known))[:2]
    if dataset in FOLDER_DATASETS:
        return FOLDER_DATASETS[dataset][1], FOLDER_DATASETS[dataset][2]
    return 32, None


def default_class_names(num_classes: int) -> list[str]:
    if num_classes == 10:
        return list(CIFAR10_CLASSES)
    if num_classes == 100:
        return list(CIFAR100_CLASSES)
    return [str(i) for i in range(num_classes)]


def class_names(dataset: str | None, root: str | None, num_classes: int) -> list[str]:
    """Class names from the dataset's own files when they are at ``root``, else the CIFAR-10/100 defaults
    (folder datasets: class indices)."""
    if dataset and root and dataset not in FOLDER_DATASETS and dataset != "folder":
        try:
            names = load_cifar(root, dataset, train=False, download=False).classes
            if len(names) == num_classes:
                return list(names)
        except OKDError:
            pass
    return default_class_names(num_classes)


def normalization(cfg_data: dict | None, dataset: str | None) -> tuple[list[float], list[float]]:
    """The run's input mean/std (its config, else the dataset's standard statistics, else CIFAR-100's)."""
    cfg_data = cfg_data or {}
    if dataset in FOLDER_DATASETS or dataset == "folder":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = DATASET_STATS.get(dataset or "", DATASET_STATS["cifar100"])
    return list(cfg_data.get("mean") or mean), list(cfg_data.get("std") or std)
