"""A user's class-folder dataset: data.compute_stats (exact, and with unreadable images), empty class folders."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from okd.config import DataConfig
from okd.data.folder import build_folder_loaders, preprocessing
from okd.errors import DataError

pytest.importorskip("PIL")
from folder_fixtures import write_class_folder  # noqa: E402
from PIL import Image  # noqa: E402


def _stats_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{
            "dataset": "folder",
            "root": str(root),
            "image_size": 12,
            "resize": 12,
            "workers": 0,
            "compute_stats": True,
            **kw,
        }
    )


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


def test_compute_stats_are_the_training_splits_mean_and_std(tmp_path):
    """Against every training pixel resized (shorter side 16, bilinear) and centre-cropped here, independently."""
    data = write_class_folder(tmp_path / "data")
    train, test, k, classes = build_folder_loaders(
        _stats_cfg(data, image_size=16, resize=16), 0, "cpu", rank=0, world_size=1
    )
    assert k == 3 and classes == ["circle", "square", "zigzag"] and len(train.dataset) == 24
    pixels = []
    for path in sorted((data / "train").glob("*/*.png")):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = 16 / min(w, h)
        img = img.resize((max(16, int(w * s)) if w > h else 16, max(16, int(h * s)) if h > w else 16), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float64) / 255.0
        top, left = int(round((arr.shape[0] - 16) / 2)), int(round((arr.shape[1] - 16) / 2))
        pixels.append(arr[top : top + 16, left : left + 16].reshape(-1, 3))
    allpix = np.concatenate(pixels)
    np.testing.assert_allclose(train.mean, allpix.mean(0), atol=1e-5)
    np.testing.assert_allclose(train.std, allpix.std(0), atol=1e-5)
    x, y = next(iter(test))
    assert x.shape == (12, 3, 16, 16) and y.tolist()[:4] == [0, 0, 0, 0]


def test_compute_stats_refuses_a_split_whose_images_are_all_unreadable(tmp_path):
    """With skip_unreadable every image is left out: nothing to average, so it fails naming the count and the first."""
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    for path in (root / "train").glob("*/*.png"):
        path.write_text("not an image")
    with pytest.raises(
        DataError, match=r"data\.compute_stats: none of the 3 training images can be read; first: .*circle.0\.png"
    ):
        build_folder_loaders(_stats_cfg(root, skip_unreadable=True), 0, "cpu", rank=0, world_size=1)


def _write_constant_green(root: Path, green: int) -> Path:
    """train/ and val/ of 2 classes x 3 random 12 x 12 PNGs whose green channel is ``green`` everywhere."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            for i in range(3):
                arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                arr[..., 1] = green
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    return root


@pytest.mark.parametrize("value", [0, 128])
def test_a_constant_channel_is_refused_by_compute_stats(tmp_path, value):
    """A channel of one value has std 0, which cannot normalise (128: E[x^2] - E[x]^2 leaves a rounding remainder
    of about 1e-17 that once let it through as std 0.0); one varying pixel in it is accepted."""
    root = _write_constant_green(tmp_path / "data", value)
    with pytest.raises(DataError, match=r"data\.compute_stats: a channel of the training images is constant \(std "):
        build_folder_loaders(_stats_cfg(root), 0, "cpu", rank=0, world_size=1)
    arr = np.asarray(Image.open(root / "train" / "a" / "0.png")).copy()
    arr[5, 6, 1] = 255  # images of 12 x 12 are used as they are: one pixel of 864 varies
    Image.fromarray(arr).save(root / "train" / "a" / "0.png")
    train = build_folder_loaders(_stats_cfg(root), 0, "cpu", rank=0, world_size=1)[0]
    assert train.mean[1] == round((value * 863 + 255) / 255 / (6 * 144), 6) and train.std[1] > 0


@pytest.mark.parametrize("std", [[0.2, 0.0, 0.2], [0.2, 0.2, -0.1]])
def test_a_std_that_is_not_positive_is_refused(tmp_path, std):
    """data.std given (compute_stats off) must be positive in every channel; a tiny positive one is used as given."""
    root = write_class_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    with pytest.raises(DataError, match=r"data\.std must be positive, got \[" + str(std[0])):
        preprocessing(_stats_cfg(root, compute_stats=False, std=std))
    classes, mean, got = preprocessing(_stats_cfg(root, compute_stats=False, std=[0.2, 1e-6, 0.2]))
    assert (classes, mean, got) == (["circle", "square", "zigzag"], [0.485, 0.456, 0.406], [0.2, 1e-6, 0.2])


def test_compute_stats_of_a_limited_run_are_those_of_the_images_it_keeps(tmp_path):
    """data.limit_train=3 keeps the first image of each class (round-robin): the statistics are those of a folder
    holding only those three, not of the whole training split."""
    root = write_class_folder(tmp_path / "data", train_per_class=3, val_per_class=1)
    kept = tmp_path / "kept"
    shutil.copytree(root, kept)
    for path in (kept / "train").glob("*/*.png"):
        if path.name != "0.png":
            path.unlink()
    classes, mean, std = preprocessing(_stats_cfg(root, limit_train=3))
    assert classes == ["circle", "square", "zigzag"]
    assert (mean, std) == tuple(preprocessing(_stats_cfg(kept))[1:])
    assert mean != preprocessing(_stats_cfg(root))[1]


def test_in_memory_decoding_names_an_unreadable_image_or_leaves_it_out(messy, caplog):
    """data.in_memory decodes every image once: an unreadable one fails with its path and the fix, or with
    data.skip_unreadable=true is left out of the held images (counted, the first named)."""
    _, dirty = messy
    held = {"compute_stats": False, "in_memory": True, "train_crop": "pad_crop", "batch_size": 2}
    refused = r"cannot read image .*notes\.png: .*\. Replace or delete it, or set data\.skip_unreadable=true to leave"
    with pytest.raises(DataError, match=refused):
        build_folder_loaders(_stats_cfg(dirty, **held), 0, "cpu", rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="okd"):
        train, test, k, _ = build_folder_loaders(
            _stats_cfg(dirty, **held, skip_unreadable=True), 0, "cpu", rank=0, world_size=1
        )
    first = str(dirty / "train" / "circle" / "notes.png")
    assert f"left out 2 unreadable image(s) (data.skip_unreadable=true); first: {first}: " in caplog.text
    assert train.images.shape == (9, 3, 12, 12) and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.images.shape[0] == 3 and k == 3
