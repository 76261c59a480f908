"""The contrastive-loss block of MCL and L-MCL (``docs/methods.md#mcl``).

- ``Embed``: Linear(d -> D) -> ReLU -> Linear(D -> D) -> row L2-normalisation, one per network (and stage);
- ``similarity(u, v, tau)``: S(U, V) = U V^T / tau, row r is anchor U_r against every row of V;
- ``sup_contrast(S, labels, weight)``: the supervised contrastive row loss SC(S; w) with the positive mask
  P_rc = [y_r = y_c] - [r = c] and the denominator mask O_rc = 1 - [r = c]; the same-index column is left out
  of both even when S compares two networks (the reference code's rule); ``instance_positive=True`` counts it as
  an extra positive and keeps it in the denominator instead (an opt-in variant);
- ``soft_contrast(S_s, S_t, T, weight)``: SKL(S_s <- S_t; w) = T^2 (1/B) sum_r w_r KL(softmax(S_t/T)_r ||
  softmax(S_s/T)_r), the target detached, every column (diagonal included) kept.

Every function is computed in the input's precision, promoted to at least float32 (float64 stays float64, so
that parity checks in float64 are exact). ``weight`` is a per-anchor (per-row) weight of shape (B,), ones when
None; it is used as given (L-MCL passes constants in its main step and differentiable weights in its meta step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import DataError
from okd.nn.losses import at_least_float32 as _promote

#: D, the embedding width of both papers' CIFAR code
EMBED_DIM = 128


class Embed(nn.Module):
    """Linear(dim_in -> dim_out, bias) -> ReLU -> Linear(dim_out -> dim_out, bias) -> x / max(||x||_2, eps).

    PyTorch default init. The reference normalises without an epsilon (a zero projection gives NaN); this one
    divides by max(||x||, 1e-12), which changes nothing for any row of norm above 1e-12 and turns the 0/0 of an
    all-zero row into a zero row instead of NaN.
    """

    def __init__(self, dim_in: int, dim_out: int = EMBED_DIM, eps: float = 1e-12) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(inplace=False), nn.Linear(dim_out, dim_out))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        z = _promote(self.proj(x.flatten(1)))
        return z / z.norm(dim=1, keepdim=True).clamp_min(self.eps)


def similarity(u: Tensor, v: Tensor, tau: float) -> Tensor:
    """S(U, V) = U V^T / tau for row-normalised U, V of shape (B, D): a (B, B) matrix.

    Outside autocast (float32 at least): under bf16 the logits in [-1/tau, 1/tau] would keep ~2 digits."""
    with torch.autocast(u.device.type, enabled=False):
        return _promote(u) @ _promote(v).t() / float(tau)


def positive_mask(labels: Tensor, *, instance_positive: bool = False) -> Tensor:
    """P_rc = [y_r = y_c] - [r = c] (float); with ``instance_positive`` the diagonal stays in: P_rc = [y_r = y_c]."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    if not instance_positive:
        same = same & ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same


def check_positives(labels: Tensor) -> None:
    """Raise ``DataError`` when some image of the batch has no other image of its class (SC would be NaN).

    Reads the labels on the host (one synchronisation); skipped while ``torch.compile`` traces a graph.
    """
    if torch.compiler.is_compiling():
        return
    counts = positive_mask(labels).sum(dim=1)
    if bool((counts == 0).any()):
        lonely = labels[counts == 0].unique().tolist()
        raise DataError(
            f"the supervised contrastive loss needs at least two images of each class in a batch, but class(es) "
            f"{lonely[:10]} appear once: train with the class-balanced sampler (data.sampler=m_per_class, "
            f"data.m_per_class >= 2)"
        )


class FirstBatchPositives:
    """``check_positives`` on the first batch a process trains on, then never again: a loader without class pairs
    (``data.sampler=random``) fails on its first step with a ``DataError``, and the class-balanced sampler gives
    every later batch its pairs, so no later step reads the labels on the host."""

    def __init__(self) -> None:
        self.checked = False

    def __call__(self, labels: Tensor) -> None:
        if self.checked or torch.compiler.is_compiling():
            return
        check_positives(labels)
        self.checked = True


def sup_contrast(
    sim: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    *,
    instance_positive: bool = False,
    check: bool = True,
) -> Tensor:
    """SC(S; w) = -(1/B) sum_r w_r (1/|P_r|) sum_c P_rc (S_rc - log sum_k O_rk exp(S_rk)).

    ``sim`` is (B, B), square or cross-network, ``labels`` (B,). The same-index column is excluded from the
    positives and the denominator (O = 1 - I); ``instance_positive=True`` keeps it in both (P = [y_r = y_c],
    O = 1). ``check`` raises ``DataError`` when an anchor has no positive (``check_positives``); pass
    ``check=False`` when the batch was already checked.
    """
    if check:
        check_positives(labels)
    sim = _promote(sim)
    pos = positive_mask(labels, instance_positive=instance_positive).to(sim.dtype)
    if instance_positive:
        log_denom = sim.logsumexp(dim=1, keepdim=True)
    else:
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        log_denom = sim.masked_fill(eye, float("-inf")).logsumexp(dim=1, keepdim=True)
    mean_log_prob = (pos * (sim - log_denom)).sum(dim=1) / pos.sum(dim=1)
    if weight is not None:
        mean_log_prob = mean_log_prob * _promote(weight).view(-1)
    return -mean_log_prob.mean()


def soft_contrast(student: Tensor, target: Tensor, temperature: float, weight: Tensor | None = None) -> Tensor:
    """SKL(S_s <- S_t; w) = T^2 (1/B) sum_r w_r sum_c q_rc (log q_rc - log p_rc).

    q = softmax(S_t / T) and p = softmax(S_s / T) along rows, every column kept (no diagonal mask). The target
    ``S_t`` is detached here: it never receives a gradient from this term.
    """
    t = float(temperature)
    log_p = F.log_softmax(_promote(student) / t, dim=1)
    log_q = F.log_softmax(_promote(target.detach()) / t, dim=1)
    row_kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    if weight is not None:
        row_kl = row_kl * _promote(weight).view(-1)
    return row_kl.mean() * (t * t)
