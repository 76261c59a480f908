"""What okd knows of a data set beyond its files (okd/data/facts.py): class names and normalisation."""

from __future__ import annotations

from okd.data.cifar import CIFAR10_CLASSES, DATASET_STATS
from okd.data.facts import (
    CIFAR100_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    class_names,
    default_class_names,
    input_geometry,
    normalization,
)


def test_default_class_names_are_cifars_for_10_and_100_classes_else_indices():
    assert default_class_names(10) == list(CIFAR10_CLASSES) and default_class_names(10)[0] == "airplane"
    assert default_class_names(100) == list(CIFAR100_CLASSES) and len(CIFAR100_CLASSES) == 100
    assert default_class_names(7) == ["0", "1", "2", "3", "4", "5", "6"]


def test_class_names_fall_back_to_the_defaults_without_the_data_sets_files(tmp_path):
    assert class_names("cifar10", str(tmp_path), 10) == list(CIFAR10_CLASSES)
    assert class_names("imagenet", str(tmp_path), 3) == ["0", "1", "2"]
    assert class_names(None, None, 100) == list(CIFAR100_CLASSES)


def test_normalization_is_the_configs_else_the_data_sets_statistics():
    assert list(normalization(None, "cifar10")) == [list(s) for s in DATASET_STATS["cifar10"]]
    assert list(normalization({}, "folder")) == [list(IMAGENET_MEAN), list(IMAGENET_STD)]
    assert list(normalization({"mean": [0.5] * 3, "std": [0.25] * 3}, "cifar10")) == [[0.5] * 3, [0.25] * 3]
    assert list(normalization(None, None)) == [list(s) for s in DATASET_STATS["cifar100"]]


def test_input_geometry_is_the_presets_the_folders_data_section_or_cifars():
    """ImageNet: 224 crops of a 256 shorter side; TinyImageNet: 64 of 64; a ``folder`` run: its data section (keys
    other than the geometry's left out), the resize defaulting to the crop over 0.875; CIFAR: 32, a plain resize."""
    assert input_geometry("imagenet") == (224, 256)
    assert input_geometry("tinyimagenet") == (64, 64)
    data = {"dataset": "folder", "image_size": 16, "resize": 20, "train_crop": "center", "batch_size": 3, "x": 1}
    assert input_geometry("folder", data) == (16, 20)
    assert input_geometry("folder", {"image_size": 28}) == (28, 32)
    assert input_geometry("cifar100") == (32, None) and input_geometry(None) == (32, None)
