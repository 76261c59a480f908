"""FFL: Feature Fusion Learning (Kim et al., arXiv 1904.09058), as in the official code (``docs/methods.md#ffl``).

A two-branch network (shared trunk up to stage 2) plus FFSD's fusion module over the branches' final maps,
concatenated (``okd.nn.fusion.FusionModule``). The fusion input is *not* detached, so the fusion losses
train the branches and the trunk too (unlike FFSD). With T = 3, targets detached inside every KL:

    L = sum_i CE(z_i) + CE(z_f) + kl_weight * w(e; 80) * [sum_i KL_T(z_f -> z_i) + KL_T(z_ens -> z_f)],

z_ens the mean of the branch logits. The fusion module has its own optimizer group with weight decay 1e-5.
Heads: each branch ("FFL-S", the sub-network; ``deploy.pt`` holds branch ``deploy_branch`` with the trunk),
``fusion`` (the fused classifier, "FFL" in most tables; it needs every branch, so it is not deployable
alone), ``mean_logits`` and ``ensemble``. ``num_branches`` > 2 generalises the sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from okd.errors import ConfigError
from okd.methods.base import MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import BranchMethod, BranchParams, check_distillation, check_int, scalar
from okd.models.multibranch import BranchOutputs
from okd.nn.fusion import FusionModule
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean, ramped_kl_weight


@dataclass
class FFLParams(BranchParams):
    num_branches: int = 2
    dropout: float | None = None
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    fusion_weight_decay: float = 1e-5
    #: true gives FFSD's choice (the fusion losses stop at the fusion module); the official FFL: false
    detach_fusion_input: bool = False
    target_eps: float = 1e-7

    def validate(self) -> None:
        super().validate()
        check_int("num_branches", self.num_branches, 2)
        check_distillation(self.temperature, self.kl_weight, self.rampup_length, self.target_eps)
        if self.fusion_weight_decay < 0:
            raise ConfigError(f"method.fusion_weight_decay must be >= 0, got {self.fusion_weight_decay}")


@register_method(
    "ffl",
    description="FFL: two branches and a fusion classifier over their maps teach each other (fusion not detached)",
    paper="Kim et al. Feature Fusion for Online Mutual Knowledge Distillation. arXiv 1904.09058",
)
class FFL(BranchMethod):
    Params = FFLParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.fusion = FusionModule(self.net.feature_dim, ctx.num_classes, self.net.num_branches)

    def param_groups(self) -> list[ParamGroup]:
        return [
            sgd_group("net", self.net.parameters(), self.ctx.optim),
            sgd_group("fusion", self.fusion.parameters(), self.ctx.optim, weight_decay=self.hp.fusion_weight_decay),
        ]

    def forward_ffl(self, images: Tensor) -> tuple[BranchOutputs, Tensor]:
        out = self.net.forward_branches(images)
        u = torch.cat(out.maps, dim=1)
        z_f, _ = self.fusion(u.detach() if self.hp.detach_fusion_input else u)
        return out, z_f

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return ramped_kl_weight(self.hp, epoch)

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        hp: FFLParams = self.hp
        out, z_f = self.forward_ffl(images)
        w = self.scalars_at(epoch, scalars)["kl_weight"]
        T, eps = hp.temperature, hp.target_eps
        losses: dict[str, Tensor] = {}
        for i, z in enumerate(out.logits):
            losses[f"branch{i}/ce"] = cross_entropy(z, labels)
            losses[f"branch{i}/kl"] = w * kl_div_t(z, z_f, T, detach_target=True, target_eps=eps)
        losses["fusion/ce"] = cross_entropy(z_f, labels)
        losses["fusion/kl"] = w * kl_div_t(z_f, logit_mean(out.logits), T, detach_target=True, target_eps=eps)
        losses["stat/kl_weight"] = scalar(w, z_f)
        return losses

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        out, z_f = self.forward_ffl(images)
        heads = self.branch_heads(out.logits)
        heads["fusion"] = z_f
        return heads
