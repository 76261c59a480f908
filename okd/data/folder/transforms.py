"""Per-image transforms on PIL images (Pillow bilinear, as torchvision's PIL path), returning H x W x 3 uint8.

Random draws come from the per-sample generator :func:`sample_generator` (a pure function of seed, epoch, index).
"""

from __future__ import annotations

import math

import numpy as np

from okd.errors import DataError

_SALT = 0x0F01D


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


class CenterCropFlipTransform(ResizeCenterCropTransform):
    """Resize(``resize``) -> CenterCrop(``crop``) -> horizontal flip (p = 1/2, if ``flip``): no random crop."""

    def __init__(self, resize: int, crop: int, flip: bool = True) -> None:
        super().__init__(resize, crop)
        self.flip = bool(flip)

    def __call__(self, img, rng: np.random.Generator) -> np.ndarray:
        arr = super().__call__(img)
        return arr[:, ::-1] if rng.integers(0, 2) == 1 and self.flip else arr
