"""The ImageNet and TinyImageNet layouts: presets of the generic class-folder reader (own scanners only
where their layout differs; transforms are the generic ones at fixed sizes)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from okd.data.folder.samplers import dist_rank_world
from okd.data.folder.scan import FolderSplit, _subdirs, scan_class_folders, scan_train_val
from okd.errors import DataError

log = logging.getLogger("okd")
_NUM_CLASSES = {"imagenet": 1000, "tinyimagenet": 200}


def scan_imagenet(root: str | os.PathLike) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of an ImageNet-style root holding ``train/`` and ``val/`` class folders."""
    train, val = scan_train_val(
        root, "imagenet", "root/train/n01440764/*.JPEG, root/val/n01440764/*.JPEG; ImageNet is not downloaded"
    )
    if len(train.classes) != _NUM_CLASSES["imagenet"] and dist_rank_world()[0] == 0:
        log.warning(
            f"{root}: {len(train.classes)} class folders (ImageNet has 1000); training a "
            f"{len(train.classes)}-way classifier"
        )
    return train, val


def _tiny_root(root: Path) -> Path:
    for cand in (root, root / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    raise DataError(
        f"data.root={str(root)!r} is not a TinyImageNet-200 folder: no wnids.txt in it or in "
        f"{str(root / 'tiny-imagenet-200')!r}. Unzip tiny-imagenet-200.zip (cs231n.stanford.edu) and point "
        "data.root at it; its train/<wnid>/images/ and val/images/ + val/val_annotations.txt are used as they are"
    )


def _read_tiny_val(root: Path, classes: list[str]) -> FolderSplit:
    ann = root / "val" / "val_annotations.txt"
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for n, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"{ann}:{n}: class {wnid!r} is not in wnids.txt")
        paths.append(os.fsencode(os.path.join("val", "images", name)))
        labels.append(index[wnid])
    if not paths:
        raise DataError(f"{ann} lists no image")
    order = np.argsort(np.array(labels), kind="stable")
    return FolderSplit(root, np.array(paths)[order], np.array(labels, dtype=np.int64)[order], classes)


def scan_tinyimagenet(root: str | os.PathLike) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of TinyImageNet-200 in its distributed layout."""
    root = _tiny_root(Path(root))
    wnids = [w.strip() for w in (root / "wnids.txt").read_text(encoding="utf-8").split() if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{root / 'wnids.txt'} lists a class twice")
    classes = sorted(wnids)
    train = scan_class_folders(root / "train", root, classes=classes, what="tinyimagenet train", reference="wnids.txt")
    if (root / "val" / "val_annotations.txt").is_file():
        val = _read_tiny_val(root, classes)
    elif (root / "val").is_dir() and _subdirs(root / "val") and _subdirs(root / "val") != ["images"]:
        val = scan_class_folders(root / "val", root, classes=classes, what="tinyimagenet val", reference="wnids.txt")
    else:
        raise DataError(f"{root / 'val'}: neither val_annotations.txt with images/ nor one folder per class")
    if len(classes) != _NUM_CLASSES["tinyimagenet"] and dist_rank_world()[0] == 0:
        log.warning(f"{root}: {len(classes)} classes in wnids.txt (TinyImageNet-200 has 200)")
    return train, val


@dataclass(frozen=True)
class Preset:
    """A fixed layout and recipe of the generic folder reader: how to scan it, and its crop sizes."""

    scan: Callable[[str | os.PathLike], tuple[FolderSplit, FolderSplit]]
    image_size: int
    resize: int  # test: shorter side before the centre crop
    train_crop: str  # random_resized | pad_crop


#: ImageNet (FFSD's recipe, docs/methods.md#ffsd): RandomResizedCrop 224 + flip; test Resize 256, CenterCrop 224.
#: TinyImageNet (CMFF): Resize 64, RandomCrop 64 with data.pad of data.padding_mode, flip; test 64/64.
PRESETS: dict[str, Preset] = {
    "imagenet": Preset(scan_imagenet, 224, 256, "random_resized"),
    "tinyimagenet": Preset(scan_tinyimagenet, 64, 64, "pad_crop"),
}
