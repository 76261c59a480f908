"""AutoAugment with its ImageNet policy on uint8 tensor batches, as torchvision's ``AutoAugment()`` (its defaults:
the ImageNet policy, nearest-neighbour geometry, zero fill) does it to PIL images, on the ops of
:mod:`okd.data.randaugment` (Pillow's arithmetic). Each image draws one of the 25 sub-policies, and for each of its
two ops a probability draw and a sign (:func:`auto_augment_draws`)."""

from __future__ import annotations

import torch
from torch import Tensor

from okd.data.randaugment import SIGNED, apply_where, op_magnitude

#: torchvision's ImageNet policy: per sub-policy, two (op, probability, magnitude bin of 10 or None)
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
    (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("equalize", 0.4, None), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, None)),
    (("posterize", 0.8, 5), ("equalize", 1.0, None)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)),
    (("equalize", 0.6, None), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)),
    (("rotate", 0.4, 9), ("equalize", 0.6, None)),
    (("equalize", 0.0, None), ("equalize", 0.8, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)),
    (("sharpness", 0.4, 7), ("invert", 0.6, None)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, None)),
    (("color", 0.4, 0), ("equalize", 0.6, None)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
)
BINS = 10


def auto_augment_draws(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per image: the sub-policy (n), a uniform draw per op (n x 2, the op runs when it is <= its probability) and a
    sign flag per op (n x 2, True: the signed magnitude is negated; torchvision negates when its sign draw is 0)."""
    policy = torch.randint(0, len(IMAGENET_POLICY), (n,), generator=gen)
    probs = torch.rand((n, 2), generator=gen)
    negative = torch.randint(0, 2, (n, 2), generator=gen).bool()
    return policy, probs, negative


def auto_augment(x: Tensor, policy: Tensor, probs: Tensor, negative: Tensor) -> Tensor:
    """AutoAugment (ImageNet policy) of a uint8 batch: op slot after op slot, each sub-policy's op is applied to the
    images that drew that sub-policy and passed its probability (:func:`~okd.data.randaugment.apply_where`)."""
    size = (x.shape[2], x.shape[3])
    policy, probs, negative = policy.to(x.device), probs.to(x.device), negative.to(x.device)
    subset = x.device.type == "cpu"
    for j in range(2):
        out = x
        for k, sub in enumerate(IMAGENET_POLICY):
            op, p, index = sub[j]
            chosen = (policy == k) & (probs[:, j] <= p)
            value = op_magnitude(op, index, BINS, size) if index is not None else 0.0
            mag = torch.full((x.shape[0],), value, dtype=torch.float64, device=x.device)
            if op in SIGNED:
                mag = torch.where(negative[:, j], -mag, mag)
            bits = int(value) if op == "posterize" else 8
            out = apply_where(out, chosen, op, x, mag, bits, subset)
        x = out
    return x
