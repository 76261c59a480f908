"""A user's class-folder dataset: data.compute_stats (exact, and with unreadable images), empty class folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from okd.config import DataConfig
from okd.data.folder import build_folder_loaders
from okd.data.folder.builder import build_transforms, split_statistics
from okd.data.folder.scan import scan_train_val
from okd.errors import DataError

pytest.importorskip("PIL")
from folder_fixtures import write_class_folder  # noqa: E402
from PIL import Image  # noqa: E402


def _stats_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), image_size=12, resize=12, compute_stats=True, workers=0, **kw)


@pytest.fixture
def messy(tmp_path) -> tuple[Path, Path]:
    """A clean folder and its copy with a non-image and a truncated PNG among the training images."""
    clean = write_class_folder(tmp_path / "clean", train_per_class=3, val_per_class=1)
    dirty = tmp_path / "dirty"
    shutil.copytree(clean, dirty)
    (dirty / "train" / "circle" / "notes.png").write_text("not an image")
    whole = (dirty / "train" / "square" / "0.png").read_bytes()
    (dirty / "train" / "square" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return clean, dirty


def test_compute_stats_names_the_unreadable_image_and_the_fix(messy):
    _, dirty = messy
    with pytest.raises(DataError, match=r"cannot read image .*notes\.png.*data\.compute_stats.*skip_unreadable=true"):
        build_folder_loaders(_stats_cfg(dirty), 0, "cpu", rank=0, world_size=1)


def test_compute_stats_honours_skip_unreadable(messy):
    clean, dirty = messy
    want = build_folder_loaders(_stats_cfg(clean), 0, "cpu", rank=0, world_size=1)[0]
    got = build_folder_loaders(_stats_cfg(dirty, skip_unreadable=True), 0, "cpu", rank=0, world_size=1)[0]
    assert got.mean == want.mean and got.std == want.std  # the statistics of the readable images alone
    assert got.mean != [0.485, 0.456, 0.406]


def test_an_empty_class_folder_is_named_with_the_fix(tmp_path):
    root = write_class_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    (root / "train" / "hexagon").mkdir()
    (root / "train" / "hexagon" / "readme.txt").write_text("todo")
    with pytest.raises(DataError, match=r"hold no image .*: hexagon\. Put that class's images into each, or delete"):
        build_folder_loaders(_stats_cfg(root), 0, "cpu", rank=0, world_size=1)


def test_compute_stats_are_the_mean_and_std_of_every_pixel(tmp_path):
    """The streamed sums equal numpy's mean and std over all test-transformed training pixels at once."""
    root = write_class_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    data_cfg = _stats_cfg(root)
    train_split, _ = scan_train_val(root)
    transform = build_transforms(data_cfg, train=False)
    pixels = (
        np.concatenate(
            [np.asarray(transform(img, None), dtype=np.float64).reshape(-1, 3) for img in _images(train_split)]
        )
        / 255.0
    )
    mean, std = split_statistics(train_split, transform)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=0), atol=1e-6)
    assert build_folder_loaders(data_cfg, 0, "cpu", rank=0, world_size=1)[0].mean == mean


def _images(split):
    for i in range(len(split)):
        with Image.open(split.path(i)) as img:
            yield img.convert("RGB")
