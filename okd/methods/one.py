"""ONE: On-the-fly Native Ensemble (Lan et al., NeurIPS 2018), as in the OKDDip repo (``docs/methods.md#one``).

A multi-branch network (shared trunk, ``num_branches`` branches) and a gate over the trunk output:
g = softmax(ReLU(BN1d(Linear(GAP(h))))), B x m. The teacher logit is z_e = sum_i g_i z_i, and

    L = sum_i CE(z_i, y) + CE(z_e, y) + kl_weight * w(e; 80) * sum_i KL_T(z_e -> z_i),   T = 3.

The official code does not detach z_e, so the KL terms also train the gate and every branch through the
teacher; that is the default here (the published numbers depend on it). ``detach_teacher=true`` is the
"clean" variant. Heads: each branch, ``mean_logits`` (the repo's "ensemble"), ``ensemble`` (mean of softmax)
and ``gated`` (z_e, the ONE-E teacher); ``deploy.pt`` holds the trunk plus branch ``deploy_branch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.methods.base import MethodContext, register_method
from okd.methods.branch_base import BranchMethod, BranchParams, check_distillation, check_int, scalar
from okd.models.multibranch import BranchOutputs, pool
from okd.nn.losses import cross_entropy, kl_div_t, ramped_kl_weight


@dataclass
class ONEParams(BranchParams):
    num_branches: int = 4
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    #: false: the official non-detached teacher (gate and branches learn through the KL targets)
    detach_teacher: bool = False
    #: added to the target probabilities inside the KL (the OKDDip repo uses 1e-7)
    target_eps: float = 1e-7

    def validate(self) -> None:
        super().validate()
        check_int("num_branches", self.num_branches, 2)
        check_distillation(self.temperature, self.kl_weight, self.rampup_length, self.target_eps)


class Gate(nn.Module):
    """ONE's gate: global average pool -> Linear(C -> m) -> BatchNorm1d(m) -> ReLU -> softmax over branches."""

    def __init__(self, in_channels: int, num_branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, h: Tensor) -> Tensor:
        return torch.softmax(self.relu(self.bn(self.fc(pool(h)))), dim=1)


def gated_logits(logits: list[Tensor], gate: Tensor) -> Tensor:
    """z_e = sum_i g_i z_i, per sample (``gate``: B x m)."""
    return (torch.stack(logits, dim=1) * gate.unsqueeze(-1)).sum(dim=1)


def one_losses(
    out: BranchOutputs,
    gate: Tensor,
    labels: Tensor,
    hp: ONEParams,
    epoch: int,
    prefix: str = "branch",
    w: float | None = None,
) -> dict[str, Tensor]:
    """ONE's named loss terms from one forward (weights already applied); ``w``: the KL weight of ``epoch``
    when the caller computed it (:meth:`ONE.epoch_scalars`)."""
    z_e = gated_logits(out.logits, gate)
    if w is None:
        w = ramped_kl_weight(hp, epoch)["kl_weight"]
    losses: dict[str, Tensor] = {}
    for i, z in enumerate(out.logits):
        losses[f"{prefix}{i}/ce"] = cross_entropy(z, labels)
        losses[f"{prefix}{i}/kl"] = w * kl_div_t(
            z, z_e, hp.temperature, detach_target=hp.detach_teacher, target_eps=hp.target_eps
        )
    losses["teacher/ce"] = cross_entropy(z_e, labels)
    losses["stat/kl_weight"] = scalar(w, z_e)
    return losses


@register_method(
    "one",
    description="ONE: multi-branch net with a gated on-the-fly teacher (OKDDip-repo form, 4 branches)",
    paper="Lan, Zhu, Gong. Knowledge Distillation by On-the-Fly Native Ensemble. NeurIPS 2018",
)
class ONE(BranchMethod):
    Params = ONEParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.gate = Gate(self.net.trunk_channels, self.net.num_branches)

    def forward_one(self, images: Tensor) -> tuple[BranchOutputs, Tensor]:
        out = self.net.forward_branches(images)
        return out, self.gate(out.trunk)

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return ramped_kl_weight(self.hp, epoch)

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        s = self.scalars_at(epoch, scalars)
        out, gate = self.forward_one(images)
        return one_losses(out, gate, labels, self.hp, epoch, w=s["kl_weight"])

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        out, gate = self.forward_one(images)
        heads = self.branch_heads(out.logits)
        heads["gated"] = gated_logits(out.logits, gate)
        return heads
