"""CL-ILR: Collaborative Learning with Intermediate-Level Representation sharing (Song & Chai, NeurIPS 2018),
as in the OKDDip repo (``train_one.py --avg --bpscale``; ``docs/methods.md#cl_ilr``).

The ONE multi-branch network without the gate. Branch i learns from the mean of the *other* branches' logits:

    L = sum_i CE(z_i, y) + kl_weight * w(e; 80) * sum_i KL_T(zbar_{-i} -> z_i),   T = 3,

with targets not detached (the repo's behaviour; ``detach_targets`` is the clean option). ILR: the trunk output
passes through :class:`GradScale`, the identity forward whose backward multiplies the gradient by 1/m, so the
trunk receives the mean rather than the sum of the branches' gradients.

``target='mean_probs'`` is the CL paper's reading (the mean of the other heads' softened probabilities);
the paper's beta weighting and T = 2 are unverified (``docs/methods.md#cl_ilr``) and not provided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from okd.methods.base import MethodContext, register_method
from okd.methods.branch_base import BranchMethod, BranchParams, check_choice, check_distillation, check_int, scalar
from okd.nn.losses import cross_entropy, kl_div_t, ramped_kl_weight


class GradScale(torch.autograd.Function):
    """Identity in the forward pass; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale`` on the way back."""
    return GradScale.apply(x, scale)


def mean_of_others(logits: list[Tensor], i: int) -> Tensor:
    """zbar_{-i} = (1/(m-1)) sum_{j != i} z_j."""
    others = [z for j, z in enumerate(logits) if j != i]
    return torch.stack(others).mean(dim=0)


def mean_of_other_probs_as_logits(logits: list[Tensor], i: int, temperature: float) -> Tensor:
    """Logits whose softmax at ``temperature`` is the mean of the other branches' softmax(z_j / T)."""
    probs = torch.stack([torch.softmax(z.float() / temperature, dim=1) for j, z in enumerate(logits) if j != i])
    return probs.mean(dim=0).clamp_min(1e-12).log() * temperature


@dataclass
class CLILRParams(BranchParams):
    num_branches: int = 4
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    #: false: the repo's non-detached targets
    detach_targets: bool = False
    #: mean_logits (OKDDip repo) | mean_probs (the CL paper's reading)
    target: str = "mean_logits"
    #: ILR: scale the trunk's incoming gradient by 1/m
    grad_rescale: bool = True
    target_eps: float = 1e-7

    def validate(self) -> None:
        super().validate()
        check_int("num_branches", self.num_branches, 2)
        check_choice("target", self.target, ("mean_logits", "mean_probs"))
        check_distillation(self.temperature, self.kl_weight, self.rampup_length, self.target_eps)


@register_method(
    "cl_ilr",
    description="CL-ILR: branches learn from the mean of the other branches; trunk gradient scaled by 1/m",
    paper="Song, Chai. Collaborative Learning for Deep Neural Networks. NeurIPS 2018",
)
class CLILR(BranchMethod):
    Params = CLILRParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._scale = 1.0 / self.net.num_branches if self.hp.grad_rescale else 1.0

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return ramped_kl_weight(self.hp, epoch)

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        hp: CLILRParams = self.hp
        logits = self.net.forward_branches(images, trunk_hook=lambda h: grad_scale(h, self._scale)).logits
        w = self.scalars_at(epoch, scalars)["kl_weight"]
        losses: dict[str, Tensor] = {}
        for i, z in enumerate(logits):
            if hp.target == "mean_logits":
                target = mean_of_others(logits, i)
            else:
                target = mean_of_other_probs_as_logits(logits, i, hp.temperature)
            losses[f"branch{i}/ce"] = cross_entropy(z, labels)
            losses[f"branch{i}/kl"] = w * kl_div_t(
                z, target, hp.temperature, detach_target=hp.detach_targets, target_eps=hp.target_eps
            )
        losses["stat/kl_weight"] = scalar(w, logits[0])
        return losses
