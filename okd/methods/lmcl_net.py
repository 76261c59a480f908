"""L-MCL's modules and loss terms besides the networks (``okd/methods/lmcl.py``, ``docs/methods.md#lmcl``).

- :class:`LossWeightNetwork` (phi): one Linear(d -> 128) per (network, head); the weight of the ordered layer pair
  (i, k; j, z), i != j, is sigmoid(cos(P_i^k f_i^k[r], P_j^z f_j^z[r])) per image r, in the loop order i, j, k, z;
- :class:`Aggregator`: per network, softmax(Linear(S d -> d) -> ReLU -> Linear(d -> S)) of the concatenated
  pooled features weighs the S heads' logits into one aggregated logit;
- :func:`layer_contrast`: the four contrastive totals summed over every ordered pair with its per-anchor weight
  (each unordered pair counted twice, as the reference code does);
- :func:`ce` and :func:`kl_t`: cross-entropy and KL at temperature T computed in the input's precision (float64
  stays float64, so that the float64 parity checks are exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.nn.contrastive import similarity, soft_contrast, sup_contrast

#: the projection width of the loss-weight network (fixed in the reference code)
WEIGHT_PROJ_DIM = 128


def promote(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch-mean cross-entropy in the logits' precision (at least float32)."""
    return F.cross_entropy(promote(logits), labels)


def kl_t(student: Tensor, target: Tensor, temperature: float) -> Tensor:
    """KL_T(target -> student) = T^2 (1/B) sum_b sum_k q (log q - log p); ``target`` is detached here."""
    t = float(temperature)
    log_p = F.log_softmax(promote(student) / t, dim=1)
    log_q = F.log_softmax(promote(target.detach()) / t, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean() * (t * t)


def ordered_pairs(num_nets: int, num_stages: int) -> list[tuple[int, int, int, int]]:
    """The ordered layer pairs (i, k, j, z) with i != j, in the reference loop order (i, then j, then k, then z)."""
    return [
        (i, k, j, z)
        for i in range(num_nets)
        for j in range(num_nets)
        if i != j
        for k in range(num_stages)
        for z in range(num_stages)
    ]


class LossWeightNetwork(nn.Module):
    """phi: a Linear(d_i^s -> 128, bias) per (network i, head s); nothing else. PyTorch default init."""

    def __init__(self, dims: list[list[int]], proj_dim: int = WEIGHT_PROJ_DIM) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.ModuleList(nn.Linear(d, proj_dim) for d in row) for row in dims)
        self.pairs = ordered_pairs(len(dims), len(dims[0]))

    def forward(self, features: list[list[Tensor]]) -> list[Tensor]:
        """One weight vector (B,) per ordered pair, in :func:`ordered_pairs` order."""
        p = [
            [F.normalize(promote(proj(f)), dim=1) for proj, f in zip(row, fs, strict=True)]
            for row, fs in zip(self.proj, features, strict=True)
        ]
        return [torch.sigmoid((p[i][k] * p[j][z]).sum(dim=1)) for i, k, j, z in self.pairs]


class Aggregator(nn.Module):
    """One network's aggregated logit: sum_s pi^s z^s, pi = softmax(Linear(S d -> d) -> ReLU -> Linear(d -> S))."""

    def __init__(self, dim: int, num_stages: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(num_stages * dim, dim), nn.ReLU(), nn.Linear(dim, num_stages))

    def mixing(self, features: list[Tensor]) -> Tensor:
        """pi, B x S: the per-image softmax over the heads."""
        return F.softmax(promote(self.gate(torch.cat(features, dim=1))), dim=1)

    def forward(self, features: list[Tensor], logits: list[Tensor]) -> Tensor:
        pi = self.mixing(features)
        return sum(pi[:, s : s + 1] * promote(z) for s, z in enumerate(logits))


def layer_contrast(
    embeddings: list[list[Tensor]],
    labels: Tensor,
    weights: list[Tensor],
    tau: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(L_VCL, L_SVCL, L_ICL, L_SICL), each summed over the ordered pairs (i, k; j, z) of :func:`ordered_pairs`.

    For a = e_i^k, b = e_j^z and weight w of the pair: VCL = SC(S(a,a); w) + SC(S(b,b); w); SVCL = SKL(S(a,a) <-
    S(b,b); w) + SKL(S(b,b) <- S(a,a); w); ICL = SC(S(a,b); w) + SC(S(b,a); w); SICL = SKL(S(a,b) <- S(b,a); w) +
    SKL(S(b,a) <- S(a,b); w); targets of SKL detached. The caller checks the batch for positives once.
    """
    n, s = len(embeddings), len(embeddings[0])
    intra = [[similarity(e, e, tau) for e in row] for row in embeddings]
    cross = {}
    totals = [0.0, 0.0, 0.0, 0.0]
    for w, (i, k, j, z) in zip(weights, ordered_pairs(n, s), strict=True):
        saa, sbb = intra[i][k], intra[j][z]
        if (i, k, j, z) not in cross:
            cross[(i, k, j, z)] = similarity(embeddings[i][k], embeddings[j][z], tau)
            cross[(j, z, i, k)] = similarity(embeddings[j][z], embeddings[i][k], tau)
        sab, sba = cross[(i, k, j, z)], cross[(j, z, i, k)]
        terms = (
            sup_contrast(saa, labels, w, check=False) + sup_contrast(sbb, labels, w, check=False),
            soft_contrast(saa, sbb, temperature, w) + soft_contrast(sbb, saa, temperature, w),
            sup_contrast(sab, labels, w, check=False) + sup_contrast(sba, labels, w, check=False),
            soft_contrast(sab, sba, temperature, w) + soft_contrast(sba, sab, temperature, w),
        )
        totals = [t + x for t, x in zip(totals, terms, strict=True)]
    return tuple(totals)  # type: ignore[return-value]
