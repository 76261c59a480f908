"""RandAugment on uint8 tensor batches, as torchvision's ``RandAugment()`` does it to PIL images (its defaults: two
ops per image, each uniform over 14, magnitude bin 9 of 31, nearest-neighbour geometry with zero fill).

The ops follow Pillow's arithmetic: the geometric ops map each output pixel centre back through the inverse affine
matrix torchvision hands to Pillow and take the pixel it falls in; the enhance ops blend with Pillow's degenerate
image (black, the "L" grey, the grey mean, the 3 x 3 SMOOTH filter) and truncate; posterize, solarize, autocontrast
and equalize use Pillow's lookup tables. Every image draws its own ops and signs (:func:`rand_augment_draws`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
    "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
#: the ops whose magnitude takes a random sign
SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}


def op_magnitude(op: str, index: int, bins: int, size: tuple[int, int]) -> float:
    """The unsigned magnitude of ``op`` at bin ``index`` of ``bins``, as torchvision's augmentation space gives it
    (float32 ``linspace`` values)."""
    h, w = size
    top = {
        "shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0 * w, "translate_y": 150.0 / 331.0 * h,
        "rotate": 30.0, "brightness": 0.9, "color": 0.9, "contrast": 0.9, "sharpness": 0.9,
    }  # fmt: skip
    if op in top:
        return float(torch.linspace(0.0, top[op], bins)[index])
    if op == "posterize":
        return float(8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()[index])
    if op == "solarize":
        return float(torch.linspace(255.0, 0.0, bins)[index])
    return 0.0


def magnitudes(size: tuple[int, int], magnitude: int = 9, bins: int = 31) -> dict[str, float]:
    """Each op's unsigned magnitude at bin ``magnitude`` of ``bins`` (RandAugment's defaults)."""
    return {op: op_magnitude(op, magnitude, bins, size) for op in OPS}


def rand_augment_draws(gen: torch.Generator, n: int, num_ops: int = 2) -> tuple[Tensor, Tensor]:
    """Per image and op slot: the op index (n x num_ops, uniform over :data:`OPS`) and a sign flag (n x num_ops)."""
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=gen)
    negative = torch.randint(0, 2, (n, num_ops), generator=gen).bool()
    return ops, negative


def _fixed(v: Tensor) -> Tensor:
    """Pillow's 16.16 fixed point of a coefficient: floor(v * 2^16 + 1/2)."""
    return torch.floor(v * 65536.0 + 0.5).long()


def affine_nearest(x: Tensor, matrix: Tensor) -> Tensor:
    """Pillow's AFFINE transform with NEAREST and fill 0: output pixel (i, j) takes the input pixel holding
    (a (j + .5) + b (i + .5) + c, d (j + .5) + e (i + .5) + f), ``matrix`` b x 6 rows (a, b, c, d, e, f), in
    Pillow's 16.16 fixed-point arithmetic (its path for NEAREST on small images), so that pixel centres that land on
    a boundary go where Pillow sends them."""
    n, ch, h, w = x.shape
    m = matrix.to(torch.float64).view(n, 6, 1, 1)
    a, b, c, d, e, f = m.unbind(1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    src_x = (_fixed(c + a * 0.5 + b * 0.5) + ys * _fixed(b) + xs * _fixed(a)) >> 16
    src_y = (_fixed(f + d * 0.5 + e * 0.5) + ys * _fixed(e) + xs * _fixed(d)) >> 16
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(n, ch, h * w)
    return x.reshape(n, ch, h * w).gather(2, index).view(n, ch, h, w) * inside.view(n, 1, h, w)


def affine_matrix(op: str, mag: Tensor, size: tuple[int, int]) -> Tensor:
    """The inverse matrices torchvision gives Pillow for the geometric ops (shears about the corner (0, 0),
    rotation about the centre; translations by whole pixels)."""
    n, (h, w) = mag.shape[0], size
    one, zero = torch.ones_like(mag), torch.zeros_like(mag)
    if op == "shear_x":  # shear angle atan(m): x_in = x + m y
        return torch.stack([one, mag, zero, zero, one, zero], 1)
    if op == "shear_y":
        return torch.stack([one, zero, zero, mag, one, zero], 1)
    if op == "translate_x":
        return torch.stack([one, zero, -mag.trunc(), zero, one, zero], 1)
    if op == "translate_y":
        return torch.stack([one, zero, zero, zero, one, -mag.trunc()], 1)
    theta = mag * (math.pi / 180.0)  # rotate: counter-clockwise by mag degrees
    cos, sin = theta.cos(), theta.sin()
    cx, cy = w * 0.5, h * 0.5
    c = cx - cos * cx + sin * cy
    f = cy - sin * cx - cos * cy
    return torch.stack([cos, -sin, c, sin, cos, f], 1).view(n, 6)


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Pillow's blend, degenerate + factor (image - degenerate), truncated and clipped to [0, 255]."""
    out = degenerate.float() + factor.view(-1, 1, 1, 1).float() * (image.float() - degenerate.float())
    return out.trunc().clamp(0, 255).to(torch.uint8)


def _grey(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, b x 1 x h x w (int64)."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _smooth(x: Tensor) -> Tensor:
    """Pillow's SMOOTH filter (3 x 3, centre 5, others 1, over 13, rounded), border pixels kept."""
    k = torch.ones(3, 3, dtype=torch.float32, device=x.device)
    k[1, 1] = 5
    c = x.shape[1]
    s = torch.nn.functional.conv2d(x.float(), (k / 13).expand(c, 1, 3, 3).contiguous(), groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (s + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return out


def _autocontrast(x: Tensor) -> Tensor:
    """Per image and channel: [lo, hi] stretched to [0, 255] with a truncating LUT (unchanged when hi <= lo)."""
    flat = x.flatten(2)
    lo = flat.min(2).values.double()[..., None, None]
    hi = flat.max(2).values.double()[..., None, None]
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)  # a true division, as Pillow's (not 255 * 1/d)
    out = (x.double() * scale + -lo * scale).trunc().clamp(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(x: Tensor) -> Tensor:
    """Pillow's equalize per image and channel: step = (pixels - count of the top level) // 255; LUT from the
    cumulative histogram, (step // 2 + pixels below) // step; unchanged when step is 0."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = torch.where(hist > 0, torch.arange(256, device=x.device), -1).max(1).values
    step = (h * w - hist.gather(1, top.view(-1, 1)).squeeze(1)) // 255
    below = torch.cumsum(hist, 1) - hist
    lut = (step.view(-1, 1) // 2 + below) // step.clamp_min(1).view(-1, 1)
    out = lut.clamp(0, 255).gather(1, flat)
    out = torch.where((step > 0).view(-1, 1), out, flat)
    return out.to(torch.uint8).view(n, c, h, w)


def apply_op(op: str, x: Tensor, mag: Tensor, bits: int = 7) -> Tensor:
    """Op ``op`` on every image of ``x`` with its signed magnitude (b); ``bits``: posterize's bits kept."""
    size = (x.shape[2], x.shape[3])
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        return affine_nearest(x, affine_matrix(op, mag, size))
    factor = 1.0 + mag
    if op == "brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if op == "color":
        return _blend(_grey(x).expand_as(x), x, factor)
    if op == "contrast":
        mean = (_grey(x).float().mean((1, 2, 3)) + 0.5).floor().view(-1, 1, 1, 1)
        return _blend(mean.expand_as(x), x, factor)
    if op == "sharpness":
        return _blend(_smooth(x), x, factor)
    if op == "posterize":
        return x & (256 - (1 << (8 - bits)))
    if op == "solarize":
        return torch.where(x.float() < mag.view(-1, 1, 1, 1).float(), x, 255 - x)
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "equalize":
        return _equalize(x)
    if op == "invert":
        return 255 - x
    return x


def apply_where(out: Tensor, chosen: Tensor, op: str, x: Tensor, mag: Tensor, bits: int, subset: bool) -> Tensor:
    """``out`` with op ``op`` of ``x`` in the images where ``chosen`` (b): on the chosen subset only when ``subset``
    (the CPU, where a host read costs nothing), else on the whole batch and kept where chosen (no host sync)."""
    if not subset:
        return torch.where(chosen.view(-1, 1, 1, 1), apply_op(op, x, mag, bits=bits), out)
    idx = chosen.nonzero().squeeze(1)
    if idx.numel() == 0:
        return out
    out = out.clone()
    out[idx] = apply_op(op, x[idx], mag[idx], bits=bits)
    return out


def rand_augment(x: Tensor, ops: Tensor, negative: Tensor, magnitude: int = 9, bins: int = 31) -> Tensor:
    """RandAugment of a uint8 batch: op slot after op slot, image i gets op ``OPS[ops[i, j]]`` with its magnitude,
    negated where ``negative[i, j]`` and the op is signed. On a GPU every op runs on the whole batch and is kept
    where chosen (fixed work per batch, no host synchronisation); on the CPU each op runs on its images only."""
    mags = magnitudes((x.shape[2], x.shape[3]), magnitude, bins)
    ops, negative = ops.to(x.device), negative.to(x.device)
    subset = x.device.type == "cpu"
    for j in range(ops.shape[1]):
        out = x
        for k, op in enumerate(OPS[1:], start=1):
            mag = torch.full((x.shape[0],), mags[op], dtype=torch.float64, device=x.device)
            if op in SIGNED:
                mag = torch.where(negative[:, j], -mag, mag)
            out = apply_where(out, ops[:, j] == k, op, x, mag, int(mags["posterize"]), subset)
        x = out
    return x
