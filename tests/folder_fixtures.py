"""Tiny ImageNet-style and TinyImageNet-style folders of real JPEGs, written by the tests themselves.

Use from a test module with ``import folder_fixtures`` and ``imagenet_folder = folder_fixtures.imagenet_folder``
(an assignment, not ``from ... import``, keeps ruff's F811 quiet); the writers are plain functions for
tests that need their own variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850")


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int], tint: int) -> None:
    from PIL import Image

    h, w = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[..., tint % 3] = np.clip(arr[..., tint % 3].astype(int) // 2 + 128, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def write_imagenet_folder(
    root: Path,
    classes: tuple[str, ...] = IMAGENET_CLASSES,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (40, 50),
    seed: int = 0,
) -> Path:
    """``root/train/<class>/<class>_<i>.JPEG`` and ``root/val/<class>/ILSVRC2012_val_<n>.JPEG``; returns root."""
    rng = np.random.default_rng(seed)
    n = 0
    for c, name in enumerate(classes):
        for i in range(train_per_class):
            _jpeg(root / "train" / name / f"{name}_{i}.JPEG", rng, size, c)
        for _ in range(val_per_class):
            n += 1
            _jpeg(root / "val" / name / f"ILSVRC2012_val_{n:08d}.JPEG", rng, size, c)
    return root


def write_tinyimagenet_folder(
    root: Path,
    wnids: tuple[str, ...] = ("n02124075", "n01443537", "n04067472"),
    train_per_class: int = 3,
    val_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """A miniature of ``tiny-imagenet-200/`` in its distributed layout (64x64 JPEGs); returns its folder.

    wnids.txt (unsorted, as the real one), words.txt, train/<wnid>/images/<wnid>_<i>.JPEG with
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<i>.JPEG with val/val_annotations.txt (tab-separated,
    with boxes), and an unlabelled test/images/.
    """
    rng = np.random.default_rng(seed)
    top = root / "tiny-imagenet-200"
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (top / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for c, w in enumerate(wnids):
        boxes = []
        for i in range(train_per_class):
            _jpeg(top / "train" / w / "images" / f"{w}_{i}.JPEG", rng, (64, 64), c)
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (top / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines, k = [], 0
    for _ in range(val_per_class):
        for c, w in enumerate(wnids):
            _jpeg(top / "val" / "images" / f"val_{k}.JPEG", rng, (64, 64), c)
            lines.append(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61\n")
            k += 1
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    _jpeg(top / "test" / "images" / "test_0.JPEG", rng, (64, 64), 0)
    return top


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageNet-style root (3 classes x 4 train / 2 val JPEGs of 40x50 px); do not modify it."""
    pytest.importorskip("PIL")
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))


def write_class_folder(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "zigzag"),
    train_per_class: int = 8,
    val_per_class: int = 4,
    seed: int = 0,
) -> Path:
    """A generic ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` dataset of tiny PNGs of varied
    sizes (18-26 px, some greyscale) whose colour depends on the class; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                h, w = (int(v) for v in rng.integers(18, 27, 2))
                arr = rng.integers(0, 96, (h, w, 3), dtype=np.uint8)
                arr[..., c % 3] += np.uint8(120)
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(arr)
                (img.convert("L") if i % 5 == 4 else img).save(path)
    return root


def quick_folder_run(data: Path, out: Path, size: int, crop: str, *extra: str) -> list[str]:
    """Overrides of a short deterministic CPU run on a :func:`write_class_folder` dataset (2 steps per epoch)."""
    return [
        "data.dataset=folder",
        f"data.root={data}",
        f"data.image_size={size}",
        f"data.resize={size}",
        f"data.train_crop={crop}",
        "data.batch_size=8",
        "data.test_batch_size=12",
        "data.workers=0",
        "data.pin_memory=false",
        "train.max_steps_per_epoch=2",
        "train.deterministic=true",
        "train.progress=none",
        "train.device=cpu",
        f"output_dir={out}",
        *extra,
    ]
