"""Class-folder scanning: ``<split>/<class>/**/<image>`` into a :class:`FolderSplit`, with clear errors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from okd.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderSplit:
    """One split: image paths (relative to ``root``, as a numpy bytes array: cheap to share with workers)."""

    root: Path
    paths: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def subset(self, indices: np.ndarray) -> FolderSplit:
        return FolderSplit(self.root, self.paths[indices], self.labels[indices], self.classes)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path, root: Path) -> list[str]:
    """Image files under ``folder`` (recursively, links followed), relative to ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        found.extend(os.path.join(rel, f) for f in filenames if _is_image(f))
    return sorted(found)


def _split_from(root: Path, per_class: list[list[str]], classes: list[str]) -> FolderSplit:
    paths = [p for files in per_class for p in files]
    labels = np.concatenate([np.full(len(f), c, dtype=np.int64) for c, f in enumerate(per_class)])
    return FolderSplit(root, np.array([os.fsencode(p) for p in paths]), labels, classes)


def _names(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def scan_class_folders(
    split_dir: Path, root: Path, classes: list[str] | None = None, what: str = "", reference: str = "train/"
) -> FolderSplit:
    """A ``<class>/**/<image>`` folder; ``classes`` (if given; from ``reference``) must match its class folders."""
    what = what or str(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{what}: folder {str(split_dir)!r} does not exist")
    found = _subdirs(split_dir)
    if not found:
        loose = [f for f in os.listdir(split_dir) if _is_image(f)]
        hint = (
            f" It holds {len(loose)} loose images: sort them into one folder per class first (for ImageNet's "
            "val/, e.g. with the widely used valprep.sh)."
            if loose
            else ""
        )
        raise DataError(f"{what}: {str(split_dir)!r} has no class folders.{hint}")
    if classes is not None and found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"{what}: {str(split_dir)!r} has {len(found)} class folders, but {reference} has {len(classes)} "
            f"classes; missing: [{_names(missing)}]; not in {reference}: [{_names(extra)}]"
        )
    per_class = [_images_under(split_dir / c, root) for c in found]
    empty = [c for c, files in zip(found, per_class, strict=True) if not files]
    if empty:
        raise DataError(
            f"{what}: {len(empty)} of {len(found)} class folders in {str(split_dir)!r} hold no image "
            f"({'/'.join(IMG_EXTENSIONS)}): {_names(empty)}. Put that class's images into each, or delete those "
            "folders from train/ and val/ alike (the two must hold the same class folders; a class with no image "
            "cannot be trained or scored)"
        )
    return _split_from(root, per_class, found)


def scan_train_val(
    root: str | os.PathLike, what: str = "folder", example: str = "root/train/cat/1.png"
) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of a root holding ``train/<class>/**`` and ``val/<class>/**`` (the same class folders)."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(
            f"data.root={str(root)!r} must hold train/ and val/ folders of class subfolders "
            f"({example}, and the same class folders under val/)"
        )
    train = scan_class_folders(root / "train", root, what=f"{what} train")
    val = scan_class_folders(root / "val", root, classes=train.classes, what=f"{what} val")
    return train, val


def balanced_prefix(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of ``limit`` samples taken round-robin over classes (the j-th image of every class, then j+1).

    Sorted by index. Used for ``data.limit_train``/``limit_test``: a plain prefix of a class-sorted folder
    would hold only the first classes.
    """
    n = len(labels)
    if limit >= n:
        return np.arange(n)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(n) - starts
    pick = order[np.lexsort((sorted_labels, rank_in_class))[:limit]]
    return np.sort(pick)
