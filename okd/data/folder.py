"""ImageNet-style image folders: ImageNet and TinyImageNet-200, decoded with Pillow in DataLoader workers.

Layouts (nothing has to be moved):
- ImageNet: ``root/train/<class>/**/*.JPEG`` and ``root/val/<class>/**/*.JPEG`` (the usual class-folder
  layout; the raw flat ``val/`` must first be sorted into class folders, e.g. with the common valprep.sh).
- TinyImageNet-200: ``root`` is ``tiny-imagenet-200/`` (or its parent): ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``
  (``file<TAB>wnid<TAB>box...``). A ``val/`` already sorted into ``val/<wnid>/`` folders is accepted too.
Class indices follow the sorted class (wnid) names, as torchvision's ``ImageFolder`` on ``train/``.

Transforms (``methods.md`` §1.7, §10), all with Pillow bilinear resampling as torchvision's PIL path:
- ImageNet train: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3, torchvision's sampling) -> flip.
  Test: Resize 256 (shorter side) -> CenterCrop 224.
- TinyImageNet (CMFF): train Resize 64 (shorter side) -> RandomCrop 64 with ``data.pad`` (4) padding of
  ``data.padding_mode`` (CMFF: zeros) -> flip. Test: Resize 64 -> CenterCrop 64. On the real 64x64 images
  both resizes are the identity; the centre crop only makes non-square images batchable.
Images leave the workers as uint8 and are normalised (ImageNet mean/std by default) on the device.

Randomness: every random draw of sample ``i`` in pass ``epoch`` comes from a generator seeded by
``(seed, epoch, i)``, and the order from ``DistributedSampler(seed=seed)`` with ``set_epoch``, so batches
do not depend on the number of workers, and the union of the ranks' batches is the single-process batch.

Sharding (:meth:`FolderLoader.shard`; default: the initialised process group): ``data.batch_size`` is the
global batch, each rank loads ``batch_size / world`` of it. Training uses ``DistributedSampler(num_replicas=
world, rank=rank, shuffle=True, drop_last=True)`` (equal batch counts on every rank; fewer than ``world``
tail samples are left out of a pass). Evaluation uses :class:`ShardSampler`, ``indices[rank::world]``
without padding, so every sample is evaluated exactly once across ranks (ranks may differ by one sample,
and so by one batch: sum the counts across ranks once, after the pass).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from okd.errors import ConfigError, DataError

log = logging.getLogger("okd")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_DATASETS = ("imagenet", "tinyimagenet")
_NUM_CLASSES = {"imagenet": 1000, "tinyimagenet": 200}
_SALT = 0x0F01D


# --------------------------------------------------------------------------------------------------- splits
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
            f"({'/'.join(IMG_EXTENSIONS)}): {_names(empty)}"
        )
    return _split_from(root, per_class, found)


def scan_imagenet(root: str | os.PathLike) -> tuple[FolderSplit, FolderSplit]:
    """``(train, val)`` of an ImageNet-style root holding ``train/`` and ``val/`` class folders."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(
            f"data.root={str(root)!r} must hold train/ and val/ folders of class subfolders "
            "(root/train/n01440764/*.JPEG, root/val/n01440764/*.JPEG); ImageNet is not downloaded automatically"
        )
    train = scan_class_folders(root / "train", root, what="imagenet train")
    val = scan_class_folders(root / "val", root, classes=train.classes, what="imagenet val")
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


# ---------------------------------------------------------------------------------------------- transforms
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("ImageNet-style folders need Pillow: pip install 'okd[images]' (or pillow)") from None
    return Image


def _resize_shorter(img, size: int):
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, longer side truncated."""
    image = _pil()
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), image.BILINEAR)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` on an H x W x C array (``round`` offsets; zero-pads if smaller)."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def _rrc_params(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageNetTrainTransform:
    """RandomResizedCrop(``size``) -> horizontal flip (p = 1/2, if ``flip``). Returns H x W x 3 uint8."""

    def __init__(self, size: int = 224, flip: bool = True) -> None:
        self.size, self.flip = int(size), bool(flip)

    def __call__(self, img, rng: np.random.Generator) -> np.ndarray:
        image = _pil()
        top, left, h, w = _rrc_params(img.size[0], img.size[1], rng)
        out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), image.BILINEAR)
        arr = np.asarray(out, dtype=np.uint8)
        if rng.integers(0, 2) == 1 and self.flip:
            arr = arr[:, ::-1]
        return arr


class ResizeCenterCropTransform:
    """Resize(``resize``, shorter side) -> CenterCrop(``crop``): ImageNet test 256/224, TinyImageNet 64/64."""

    def __init__(self, resize: int = 256, crop: int = 224) -> None:
        self.resize, self.crop = int(resize), int(crop)

    def __call__(self, img, rng: np.random.Generator | None = None) -> np.ndarray:
        return _center_crop(np.asarray(_resize_shorter(img, self.resize), dtype=np.uint8), self.crop)


class TinyTrainTransform:
    """CMFF's TinyImageNet recipe: Resize(64) -> RandomCrop(64, padding=pad, padding_mode) -> flip."""

    def __init__(self, size: int = 64, pad: int = 4, padding_mode: str = "zeros", flip: bool = True) -> None:
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode must be zeros or reflect, got {padding_mode!r}")
        self.size, self.pad, self.padding_mode, self.flip = int(size), int(pad), padding_mode, bool(flip)

    def __call__(self, img, rng: np.random.Generator) -> np.ndarray:
        arr = np.asarray(_resize_shorter(img, self.size), dtype=np.uint8)
        p = self.pad
        if p > 0:
            mode = "constant" if self.padding_mode == "zeros" else "reflect"
            arr = np.pad(arr, ((p, p), (p, p), (0, 0)), mode=mode)
        h, w = arr.shape[:2]
        top = int(rng.integers(0, h - self.size + 1))
        left = int(rng.integers(0, w - self.size + 1))
        arr = arr[top : top + self.size, left : left + self.size]
        if rng.integers(0, 2) == 1 and self.flip:
            arr = arr[:, ::-1]
        return arr


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in pass ``epoch``: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index), _SALT])


# ------------------------------------------------------------------------------------------------- dataset
class FolderDataset(Dataset):
    """Decodes ``split`` with Pillow and applies ``transform`` ``views`` times.

    Indexed by ``(epoch, index)`` (see :class:`EpochTaggedSampler`), so workers need no epoch state.
    Returns ``(uint8 tensor C x H x W, or views x C x H x W; label; None)``, or ``(None, label, 'path: error')``
    for an unreadable image (the loader decides whether to fail or skip).
    """

    def __init__(self, split: FolderSplit, transform: Callable, *, train: bool, seed: int = 0, views: int = 1):
        self.split, self.transform, self.train = split, transform, bool(train)
        self.seed, self.views = int(seed), int(views)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int):
        image = _pil()
        with image.open(self.split.path(index)) as img:
            return img.convert("RGB")

    def __getitem__(self, key: tuple[int, int] | int):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        label = int(self.split.labels[index])
        try:
            img = self.load(index)
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            return None, label, f"{self.split.path(index)}: {type(exc).__name__}: {reason}"
        rng = sample_generator(self.seed, epoch, index) if self.train else None
        arrs = [self.transform(img, rng) for _ in range(self.views if self.train else 1)]
        tensors = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrs]
        return (tensors[0] if len(tensors) == 1 else torch.stack(tensors)), label, None


def collate_samples(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable samples; return ``(x uint8, y int64, errors)``."""
    good = [it for it in items if it[0] is not None]
    errors = [it[2] for it in items if it[0] is None]
    x = torch.stack([g[0] for g in good]) if good else torch.empty(0, dtype=torch.uint8)
    y = torch.tensor([g[1] for g in good], dtype=torch.int64)
    return x, y, errors


# ------------------------------------------------------------------------------------------------ samplers
class ShardSampler(Sampler[int]):
    """Exact evaluation sharding: ``range(rank, n, world)``, in order, no padding, no drop."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every index of ``base``; ``epoch`` is read when iteration starts."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base, self.epoch = base, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# -------------------------------------------------------------------------------------------------- loader
class FolderLoader:
    """Batches of ``(x, y)`` on ``device`` from a :class:`FolderDataset`, with DeviceLoader's interface.

    ``set_epoch(e)`` selects the pass (then each pass advances it by one); ``x`` is float32 normalised with
    ``mean``/``std`` ([0, 1] scale), channels-last if ``channels_last``; with ``views > 1`` (training) a
    list of independent augmentations.

    ``batch_size`` is the global batch, as DeviceLoader's. :meth:`shard` (default: the initialised process
    group, else rank 0 of 1) makes this rank load ``batch_size / world_size`` images per training batch
    (must divide) and ``ceil(batch_size / world_size)`` per test batch; ``len()`` is this rank's batch count.
    Unreadable images raise :class:`DataError` with their path, or, with ``skip_unreadable``, are left out
    of their batch and counted (``skipped``; logged once per pass).
    """

    def __init__(
        self,
        dataset: FolderDataset,
        batch_size: int,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_last: bool = False,
        workers: int = 0,
        pin_memory: bool = True,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        skip_unreadable: bool = False,
        name: str = "",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.dataset, self.batch_size, self.train = dataset, int(batch_size), dataset.train
        self.views = dataset.views
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.channels_last, self.skip_unreadable = channels_last, bool(skip_unreadable)
        self.drop_last, self.workers = bool(drop_last) and self.train, int(workers)
        self._pin = bool(pin_memory) and self.device.type == "cuda"
        self.name = name or ("train" if self.train else "test")
        self.epoch, self.skipped = 0, 0
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self.rank = self.world_size = -1
        self.shard(*((rank, world_size) if rank is not None else dist_rank_world()))

    def shard(self, rank: int, world_size: int) -> None:
        """Load only rank ``rank``'s share of every pass (idempotent; rebuilds the DataLoader on a change).

        Training: ``DistributedSampler(num_replicas=world_size, rank=rank, shuffle=True, seed,
        drop_last=True)``: one permutation per epoch for all ranks, rank r takes positions r::world_size, so
        rank r's b-th batch is positions r::world_size of the single-process b-th global batch; every rank
        has the same number of batches (up to world_size - 1 tail images are left out of a pass).
        Evaluation: :class:`ShardSampler` (``indices[rank::world_size]``, no padding): every image is
        evaluated exactly once across ranks; ranks may differ by one image (and so by one batch).
        """
        rank, world_size = int(rank), int(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if (rank, world_size) == (self.rank, self.world_size):
            return
        if self.train and self.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by the "
                f"{world_size} processes; choose a multiple of {world_size}"
            )
        self.rank, self.world_size = rank, world_size
        self.rank_batch_size = self.batch_size // world_size if self.train else math.ceil(self.batch_size / world_size)
        if self.train:
            self.sampler: Sampler[int] = DistributedSampler(
                self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.dataset.seed, drop_last=True
            )
        else:
            self.sampler = ShardSampler(len(self.dataset), rank, world_size)
        self._tagged = EpochTaggedSampler(self.sampler)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.rank_batch_size,
            sampler=self._tagged,
            num_workers=self.workers,
            collate_fn=collate_samples,
            pin_memory=self._pin,
            drop_last=self.drop_last,
            persistent_workers=self.workers > 0,
        )

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per pass (after sharding and ``drop_last``; before skipping)."""
        return min(len(self) * self.rank_batch_size, len(self.sampler))

    @property
    def dataset_size(self) -> int:
        """Images in the whole split (all ranks)."""
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self._shift, x.float(), self._scale)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        self._tagged.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        skipped, first = 0, ""
        for xb, yb, errors in self.loader:
            if errors:
                if not self.skip_unreadable:
                    raise DataError(
                        f"cannot read image {errors[0]}. Replace or delete it, or set data.skip_unreadable=true "
                        "to leave unreadable images out (they are counted and logged)"
                    )
                skipped += len(errors)
                self.skipped += len(errors)
                first = first or errors[0]
            if yb.numel() == 0:
                continue
            x = xb.to(self.device, non_blocking=self._pin)
            y = yb.to(self.device, non_blocking=self._pin)
            if x.ndim == 5:
                yield [self.normalize(x[:, v]) for v in range(x.shape[1])], y
            elif self.views > 1:
                xn = self.normalize(x)
                yield [xn] * self.views, y
            else:
                yield self.normalize(x), y
        if skipped:
            log.warning(
                f"{self.name}: skipped {skipped} unreadable image(s) in this pass on rank {self.rank} "
                f"(data.skip_unreadable=true); first: {first}"
            )


# ------------------------------------------------------------------------------------------------- builder
def build_transforms(data_cfg, train: bool) -> Callable:
    """The transform of ``data_cfg.dataset`` (``imagenet`` | ``tinyimagenet``) for one split."""
    if data_cfg.dataset == "imagenet":
        return ImageNetTrainTransform(224, flip=data_cfg.flip) if train else ResizeCenterCropTransform(256, 224)
    if data_cfg.dataset == "tinyimagenet":
        if train:
            return TinyTrainTransform(64, pad=data_cfg.pad, padding_mode=data_cfg.padding_mode, flip=data_cfg.flip)
        return ResizeCenterCropTransform(64, 64)
    raise DataError(f"data.dataset={data_cfg.dataset!r} is not an image-folder dataset ({', '.join(FOLDER_DATASETS)})")


def scan(dataset: str, root: str | os.PathLike) -> tuple[FolderSplit, FolderSplit]:
    if dataset == "imagenet":
        return scan_imagenet(root)
    if dataset == "tinyimagenet":
        return scan_tinyimagenet(root)
    raise DataError(f"data.dataset={dataset!r} is not an image-folder dataset ({', '.join(FOLDER_DATASETS)})")


def build_folder_loaders(
    data_cfg,
    seed: int,
    device: torch.device | str | None,
    views: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[FolderLoader, FolderLoader, int, list[str]]:
    """``(train_loader, test_loader, num_classes, class_names)`` for an ImageNet or TinyImageNet folder.

    ``data.batch_size``/``test_batch_size`` are global batches, sharded over ``rank``/``world_size``
    (default: the initialised process group; see :meth:`FolderLoader.shard`). ``limit_train`` /
    ``limit_test`` keep that many images, round-robin over classes (:func:`balanced_prefix`).
    """
    _pil()
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = dist_rank_world()
    mean = list(data_cfg.mean) if data_cfg.mean is not None else list(IMAGENET_MEAN)
    std = list(data_cfg.std) if data_cfg.std is not None else list(IMAGENET_STD)
    if any(s <= 0 for s in std):
        raise DataError(f"data.std must be positive, got {std}")
    train_split, test_split = scan(data_cfg.dataset, data_cfg.root)
    loaders = []
    for train, split, limit in ((True, train_split, data_cfg.limit_train), (False, test_split, data_cfg.limit_test)):
        if limit is not None:
            split = split.subset(balanced_prefix(split.labels, limit))
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
