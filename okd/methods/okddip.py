"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen et al., AAAI 2020), ``docs/methods.md#okddip``.

A multi-branch network with ``num_branches`` = m + 1 branches: m auxiliary peers and, last, the group leader
(the deployed model). Peer attention with projections shared by all peers (Linear d -> d/8, no bias):
q_a = W_q h_a, k_a = W_k h_a, e_ab = q_a . k_b (no 1/sqrt(d)), alpha_ab = softmax_b(e_ab) over all peers
including b = a, and peer a's target is t_a = sum_b alpha_ab z_b (per sample). The leader learns from the
mean of the peers' logits, zbar. With T = 3:

    L = sum_a CE(z_a, y) + CE(z_L, y) + kl_weight * w(e; 80) * [sum_a KL_T(t_a -> z_a) + KL_T(zbar -> z_L)].

The official code detaches nothing: W_q and W_k learn only through the KL targets, and the leader's KL also
trains the peers. Both are the defaults; ``detach_leader_target`` and ``detach_peer_targets`` (which freezes
W_q/W_k) are options, and ``self_attention=false`` drops alpha_aa. The repo steps its scheduler at the start
of each epoch. Under the PyTorch 1.0.1 it pins, that decays at 0-based epochs 150 and 225, as okd's default
milestones (which the configs follow); only on PyTorch >= 1.1 does the same loop decay one epoch early (149,
224), which ``optim.milestones=[149,224]`` reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.methods.base import MethodContext, register_method
from okd.methods.branch_base import (
    BranchMethod,
    BranchParams,
    average_accuracy,
    check_distillation,
    check_int,
    ensemble_heads,
    scalar,
)
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean, ramped_kl_weight


@dataclass
class OKDDipParams(BranchParams):
    #: peers + 1 leader (the last branch)
    num_branches: int = 4
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    #: include alpha_aa (a peer attending to itself), as the official code does
    self_attention: bool = True
    #: projection width d // proj_ratio
    proj_ratio: int = 8
    detach_peer_targets: bool = False
    detach_leader_target: bool = False
    target_eps: float = 1e-7
    #: the leader (the last branch) is deployed by default
    deploy_branch: int = -1

    def validate(self) -> None:
        super().validate()
        check_int("num_branches", self.num_branches, 3 if not self.self_attention else 2)
        check_int("proj_ratio", self.proj_ratio, 1)
        check_distillation(self.temperature, self.kl_weight, self.rampup_length, self.target_eps)


class PeerAttention(nn.Module):
    """Shared query/key projections and the per-sample attention of every peer over all peers."""

    def __init__(self, dim: int, proj_dim: int, self_attention: bool = True) -> None:
        super().__init__()
        self.query = nn.Linear(dim, proj_dim, bias=False)
        self.key = nn.Linear(dim, proj_dim, bias=False)
        self.self_attention = self_attention

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features``: m tensors B x d. Returns alpha, B x m x m (row a: peer a's weights over peers b)."""
        h = torch.stack(features, dim=1)
        energy = self.query(h) @ self.key(h).transpose(1, 2)
        if not self.self_attention:
            eye = torch.eye(energy.shape[1], dtype=torch.bool, device=energy.device)
            energy = energy.masked_fill(eye, float("-inf"))
        return torch.softmax(energy, dim=-1)


def attention_targets(alpha: Tensor, logits: list[Tensor]) -> Tensor:
    """t_a = sum_b alpha_ab z_b for every peer: B x m x K."""
    return alpha @ torch.stack(logits, dim=1)


def peer_diversity(logits: list[Tensor]) -> Tensor:
    """The repo's diversity statistic: mean over samples of the summed pairwise L2 distances between the peers'
    softmax outputs, divided by the number of pairs."""
    probs = [torch.softmax(z.detach().float(), dim=1) for z in logits]
    pairs = [(a, b) for a in range(len(probs)) for b in range(a + 1, len(probs))]
    if not pairs:
        return probs[0].new_zeros(())
    return sum((probs[a] - probs[b]).norm(dim=1).mean() for a, b in pairs) / len(pairs)


@register_method(
    "okddip",
    description="OKDDip: peers learn from attention-weighted peer logits; a leader branch learns from the peers",
    paper="Chen, Mei, Wang, Feng, Chen. Online Knowledge Distillation with Diverse Peers. AAAI 2020",
)
class OKDDip(BranchMethod):
    Params = OKDDipParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        d = self.net.feature_dim
        self.attention = PeerAttention(d, d // self.hp.proj_ratio, self.hp.self_attention)
        self.num_peers = self.net.num_branches - 1

    def branch_name(self, i: int) -> str:
        return "leader" if i == self.net.num_branches - 1 else f"peer{i}"

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return ramped_kl_weight(self.hp, epoch)

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        hp: OKDDipParams = self.hp
        out = self.net.forward_branches(images)
        m = self.num_peers
        peers, z_leader = out.logits[:m], out.logits[m]
        targets = attention_targets(self.attention(out.features[:m]), peers)
        w = self.scalars_at(epoch, scalars)["kl_weight"]
        T, eps = hp.temperature, hp.target_eps
        losses: dict[str, Tensor] = {}
        for a, z in enumerate(peers):
            losses[f"peer{a}/ce"] = cross_entropy(z, labels)
            losses[f"peer{a}/kl"] = w * kl_div_t(
                z, targets[:, a], T, detach_target=hp.detach_peer_targets, target_eps=eps
            )
        losses["leader/ce"] = cross_entropy(z_leader, labels)
        losses["leader/kl"] = w * kl_div_t(
            z_leader, logit_mean(peers), T, detach_target=hp.detach_leader_target, target_eps=eps
        )
        losses["stat/kl_weight"] = scalar(w, z_leader)
        losses["stat/peer_diversity"] = peer_diversity(peers)
        return losses

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        logits = self.net(images)
        heads = {self.branch_name(i): z for i, z in enumerate(logits)}
        heads.update(ensemble_heads(logits[: self.num_peers], prefix="peer_"))
        return heads

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_peer": [f"peer{a}" for a in range(self.num_peers)]}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``peer_avg``: the mean accuracy of the peers (the leader is reported on its own)."""
        return average_accuracy(metrics, [f"peer{a}" for a in range(self.num_peers)], "peer_avg")
