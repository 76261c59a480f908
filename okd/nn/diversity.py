"""FFSD's attention-diversity target, loss D and feature-space target Ψ (``docs/methods.md#ffsd``, FFSD.4).

This reproduces the official arithmetic exactly, quirks included (do not "fix" them):
- the threshold τ is the k-th smallest *normalised* attention value, k = floor(N/3), N = H·W;
- the target is t = (n/2 - ŷ)·sign(ŷ - τ) + n/2 where n is the norm of the *un-normalised* map, so
  t = n - ŷ above τ, t = ŷ below τ, and t = n/2 exactly at τ (sign(0) = 0);
- t is not re-normalised, although x̂ has unit norm.

Nothing detaches implicitly: :func:`diversity_loss` takes an explicit ``detach_target``; the callers of
:func:`diversity_target` and :func:`diversity_feature_target` pass detached maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from okd.nn.losses import attention_map, l2_normalize_per_sample, normalized_l2


def diversity_k(num_elements: int) -> int:
    """k = floor(N / 3) (21 for 8x8 maps, 16 for 7x7); at least 1 (the official code fails for N < 3)."""
    return max(1, int(num_elements) // 3)


def diversity_target(att: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Diversity target of an attention map ``att`` (B x 1 x H x W, or any B x ...).

    Returns ``(t, y_hat, n)``, flattened per sample: the target t (B x N), the normalised map ŷ (B x N) and
    the un-normalised per-sample norm n (B x 1).
    """
    y = att.float().flatten(1)
    n = y.norm(dim=1, keepdim=True)
    y_hat = l2_normalize_per_sample(y)
    tau = torch.kthvalue(y_hat, diversity_k(y_hat.shape[1]), dim=1, keepdim=True).values
    t = (n / 2 - y_hat) * torch.sign(y_hat - tau) + n / 2
    return t, y_hat, n


def diversity_loss(att_current: Tensor, att_previous: Tensor, *, detach_target: bool) -> Tensor:
    """D(x, y) = mean_{b,n} (x̂ - t(y))^2: push the current attention map away from the previous one's."""
    if detach_target:
        att_previous = att_previous.detach()
    t, _, _ = diversity_target(att_previous)
    return (l2_normalize_per_sample(att_current) - t).pow(2).mean()


def diversity_feature_target(features: Tensor) -> Tensor:
    """Ψ(Y) = Y + reshape((t - â)·n / C) broadcast over the C channels, with a = att(Y) (Y: B x C x H x W).

    The SD module's input for the common students; pass a detached Y.
    """
    att = attention_map(features)
    t, a_hat, n = diversity_target(att)
    delta = (t - a_hat) * n / features.shape[1]
    return features + delta.view_as(att)


def l2_diversity_loss(current: list[Tensor], previous: list[Tensor], *, detach_target: bool) -> Tensor:
    """The paper's "L2" diversity read as in the official (unused) ``l2_loss``, negated (Eq. 6 is a
    *negative* reconstruction error): -sum_j NL2(att(current_j), att(previous_j))."""
    if len(current) != len(previous):
        raise ValueError(f"{len(current)} current maps but {len(previous)} previous maps")
    total = current[0].new_zeros((), dtype=torch.float32)
    for cur, prev in zip(current, previous, strict=True):
        if detach_target:
            prev = prev.detach()
        total = total - normalized_l2(attention_map(cur), attention_map(prev))
    return total
