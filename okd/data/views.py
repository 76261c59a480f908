"""Named per-view augmentations (OKDPH's ``transes``): each network of a cohort sees its own kind of view.

Every view but ``base`` starts with the loader's random crop (``data.pad``, ``data.padding_mode``); then:

- ``hflip``: horizontal flip with probability 1/2;
- ``hflip+rot``: the flip, then a rotation by an angle uniform in [-15, 15] degrees about the image centre,
  nearest-neighbour, zero fill (torchvision's ``RandomRotation(15)`` on PIL images);
- ``cutout``: the flip, then one 16 x 16 hole (centre uniform over the pixel grid, clipped at the borders) set to
  raw pixel 0, i.e. before normalisation;
- ``augment``: no flip; torchvision's ``RandAugment()`` with its defaults (:mod:`okd.data.randaugment`);
- ``base``: no crop and no flip, normalisation only.

All ops run on uint8 batches on the loader's device; their draws come from the loader's per-epoch generator, so
a resumed run sees the same views. AutoAugment (``auto_aug``, ImageNet policy) is not implemented:
:func:`check_view_names` refuses it by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from okd.data.randaugment import rand_augment_draws
from okd.errors import ConfigError


@dataclass(frozen=True)
class ViewKind:
    """What one named view does after (optionally) the random crop."""

    crop: bool = True
    flip: bool = True
    rotate: float = 0.0  # max |angle| in degrees (0: none)
    cutout: int = 0  # side of the square hole (0: none)
    randaugment: bool = False  # torchvision's RandAugment() defaults (okd.data.randaugment)


VIEW_KINDS: dict[str, ViewKind] = {
    "hflip": ViewKind(),
    "hflip+rot": ViewKind(rotate=15.0),
    "cutout": ViewKind(cutout=16),
    "augment": ViewKind(flip=False, randaugment=True),
    "base": ViewKind(crop=False, flip=False),
}

#: views the OKDPH release names that okd does not implement yet, and what they are
MISSING_VIEWS = {
    "auto_aug": "torchvision's AutoAugment() with its ImageNet policy after the crop",
}


def check_view_names(names: Sequence[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming ``where`` for any view okd cannot produce."""
    for name in names:
        if name in MISSING_VIEWS:
            raise ConfigError(
                f"{where}: the view {name!r} ({MISSING_VIEWS[name]}) is not implemented in okd yet; use one of "
                f"{', '.join(VIEW_KINDS)} in its place"
            )
        if name not in VIEW_KINDS:
            raise ConfigError(f"{where}: unknown view {name!r}; choose from {', '.join(VIEW_KINDS)}")


def view_draws(gen: torch.Generator, views: int, n: int, size: tuple[int, int]) -> dict[str, Tensor]:
    """Per view and image, drawn on the CPU after the crop and flip draws: ``angles``, a rotation fraction uniform
    in [-1, 1) (views x n); ``centres``, a cutout centre (views x n x 2, row and column uniform over the grid);
    ``ops`` and ``negative``, RandAugment's two op indices and sign flags (views x n x 2 each)."""
    angles = torch.rand((views, n), generator=gen, dtype=torch.float64) * 2 - 1
    rows = torch.randint(0, size[0], (views, n, 1), generator=gen)
    cols = torch.randint(0, size[1], (views, n, 1), generator=gen)
    ops, negative = rand_augment_draws(gen, views * n)
    return {
        "angles": angles,
        "centres": torch.cat([rows, cols], dim=2),
        "ops": ops.view(views, n, -1),
        "negative": negative.view(views, n, -1),
    }


def rotate_nearest(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of a uint8 batch counter-clockwise by ``degrees`` (b) about its centre: each output pixel
    centre is mapped back into the input and takes the pixel it falls in, or 0 outside (PIL's NEAREST rotate)."""
    b, c, h, w = x.shape
    theta = degrees.to(torch.float64) * (math.pi / 180.0)
    cos, sin = theta.cos().view(b, 1, 1), theta.sin().view(b, 1, 1)
    ys = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1) + 0.5 - h / 2
    xs = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w) + 0.5 - w / 2
    src_x = torch.floor(cos * xs - sin * ys + w / 2).long()
    src_y = torch.floor(sin * xs + cos * ys + h / 2).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return out * inside.view(b, 1, h, w)


def cutout(x: Tensor, centres: Tensor, size: int) -> Tensor:
    """Zero rows [y - size/2, y + size/2) and columns [x - size/2, x + size/2) of each image (centres b x 2),
    clipped to the image."""
    b, _, h, w = x.shape
    half = size // 2
    y, xc = centres[:, :1], centres[:, 1:]
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= y - half) & (rows < y + half)
    in_cols = (cols >= xc - half) & (cols < xc + half)
    hole = in_rows.view(b, 1, h, 1) & in_cols.view(b, 1, 1, w)
    return x * ~hole
