"""Rotation self-supervision: the 4x rotated batch, its joint labels and the similarity CE over its views
(CMFF, ``docs/methods.md#cmff``; :mod:`okd.methods.cmff`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_batch(images: Tensor) -> Tensor:
    """B x C x H x W -> 4B images, row 4b + r = rot90(images[b], r) in the (H, W) plane (interleaved per sample)."""
    return torch.stack([torch.rot90(images, r, (2, 3)) for r in range(4)], dim=1).flatten(0, 1)


def joint_labels(labels: Tensor) -> Tensor:
    """y (B) -> 4B joint labels, row 4b + r = 4 y_b + r."""
    return torch.stack([labels * 4 + r for r in range(4)], dim=1).flatten()


def similarity_ce(rep: Tensor, temperature: float = 1.0) -> Tensor:
    """L_sim on 4B projections laid out as :func:`rotate_batch`: each rotated row 4b + r (r = 1..3) scores
    cos(u_{4b+r}, u_{4j}) / tau against every unrotated row 4j; CE with target j = b, mean over the 3B queries."""
    rep = rep.float()
    b = rep.shape[0] // 4
    if rep.shape[0] != 4 * b or b == 0:
        raise ValueError(f"similarity_ce needs 4B rows (rotate_batch layout), got {rep.shape[0]}")
    groups = F.normalize(rep.reshape(b, 4, -1), dim=2, eps=1e-8)
    anchors, queries = groups[:, 0], groups[:, 1:].reshape(3 * b, -1)
    sim = queries @ anchors.t()  # 3B x B
    target = torch.arange(b, device=rep.device).repeat_interleave(3)
    return F.cross_entropy(sim / temperature, target)
