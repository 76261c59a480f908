"""L1 distances between class distributions, and the one-hot labels they compare with (SwitOKD's switch
statistics, ``docs/methods.md#switokd``).

Each distance is a batch mean of per-sample L1 norms, computed in at least float32 (float64 stays float64, so
a float64 parity check is not rounded to float32). Nothing here detaches: callers pass detached logits when
the quantity must not train anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def one_hot(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Labels as one-hot rows of width ``num_classes`` (the run's class count), in ``like``'s float dtype."""
    return F.one_hot(labels, num_classes).to(_at_least_f32(like).dtype)


def label_l1(logits: Tensor, targets: Tensor) -> Tensor:
    """(1/B) sum_b || softmax(z_b) - y_b ||_1 for probability rows ``targets`` (e.g. :func:`one_hot`)."""
    p = F.softmax(_at_least_f32(logits), dim=1)
    return (p - targets).abs().sum(dim=1).mean()


def prob_l1(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """(1/B) sum_b || softmax(a_b) - softmax(b_b) ||_1."""
    p = F.softmax(_at_least_f32(logits_a), dim=1)
    q = F.softmax(_at_least_f32(logits_b), dim=1)
    return (p - q).abs().sum(dim=1).mean()
