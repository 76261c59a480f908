"""Shared plumbing of the multi-branch methods (ONE, CL-ILR, individual branches, OKDDip, FFL).

Not a method itself: it owns one :class:`~okd.models.multibranch.MultiBranchNet`, its optimizer group, the
usual evaluation heads and the deployable network (the trunk plus one branch, as a plain backbone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, sgd_group
from okd.models.multibranch import MultiBranchNet
from okd.nn.losses import logit_mean, softmax_ensemble


@dataclass
class BranchParams:
    """Knobs every branch method shares."""

    num_branches: int = 4
    #: dropout of branch classifiers that have one (VGG-16: 0.5 in the ONE/OKDDip files); null keeps the backbone's
    dropout: float | None = 0.5
    #: OKDDip-repo DenseNet bug: every branch holds the same last dense block (off: own weights per branch)
    share_branch_block: bool = False
    #: which branch ``deploy.pt`` holds (with the trunk); negative counts from the last
    deploy_branch: int = 0

    def validate(self) -> None:
        check_int("num_branches", self.num_branches, 1)
        check_dropout(self.dropout)
        if not -self.num_branches <= self.deploy_branch < self.num_branches:
            raise ConfigError(
                f"method.deploy_branch={self.deploy_branch} is not a branch; choose 0..{self.num_branches - 1}"
                " (or a negative index from the last)"
            )


def check_int(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"method.{key} must be >= {low}, got {value}")


def check_dropout(dropout: float | None) -> None:
    """``method.dropout`` (of branch classifiers that have one): in [0, 1), or null to keep the backbone's."""
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ConfigError(f"method.dropout must be in [0, 1) or null, got {dropout}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"method.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def check_distillation(temperature: float, kl_weight: float, rampup_length: int = 0, target_eps: float = 0.0) -> None:
    """The KL knobs most methods share: T > 0, weight >= 0, ramp-up length >= 0, target epsilon >= 0."""
    if temperature <= 0:
        raise ConfigError(f"method.temperature must be positive, got {temperature}")
    if kl_weight < 0:
        raise ConfigError(f"method.kl_weight must be >= 0, got {kl_weight}")
    if rampup_length < 0:
        raise ConfigError(f"method.rampup_length must be >= 0 (0 disables the ramp-up), got {rampup_length}")
    if target_eps < 0:
        raise ConfigError(f"method.target_eps must be >= 0, got {target_eps}")


def ensemble_heads(logits: list[Tensor], prefix: str = "") -> dict[str, Tensor]:
    """``<prefix>mean_logits`` (mean of logits, the OKDDip repo's "ensemble") and ``<prefix>ensemble``
    (mean of softmax, a true ensemble)."""
    return {f"{prefix}mean_logits": logit_mean(logits), f"{prefix}ensemble": softmax_ensemble(logits)}


def average_accuracy(metrics: dict[str, float], heads: list[str], name: str) -> dict[str, float]:
    """``<name>/top1|top5``: the mean of these heads' accuracies (the repos' "average"; not an ensemble)."""
    out = {}
    for k in ("top1", "top5"):
        values = [metrics[f"{h}/{k}"] for h in heads if f"{h}/{k}" in metrics]
        if values and len(values) == len(heads):
            out[f"{name}/{k}"] = sum(values) / len(values)
    return out


def scalar(value: float, like: Tensor) -> Tensor:
    """A logged constant (``stat/...``) on the device of ``like`` (no host-to-device copy). Written as a product
    so that a compiled step takes ``value`` as an input (``new_full`` would bake it into the graph)."""
    return like.new_ones((), dtype=torch.float32) * value


class BranchMethod(Method):
    """A method over one multi-branch network; subclasses write ``training_step``."""

    head_prefix = "branch"
    mixed_cohort = (
        "its branches share one trunk (the stages before the branch split) and repeat the same later stages, so "
        "every branch is the same network"
    )
    cohort_key = "num_branches"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: BranchParams = ctx.params
        self.net = MultiBranchNet(
            ctx.model,
            ctx.num_classes,
            hp.num_branches,
            dropout=hp.dropout,
            share_branch_block=hp.share_branch_block,
        )
        self.deploy_index = hp.deploy_branch % hp.num_branches
        self.deploy_head = self.branch_name(self.deploy_index)

    def branch_name(self, i: int) -> str:
        return f"{self.head_prefix}{i}"

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group("net", self.parameters(), self.ctx.optim)]

    def branch_heads(self, logits: list[Tensor]) -> dict[str, Tensor]:
        """Each branch, the mean of logits and the softmax ensemble."""
        heads = {self.branch_name(i): z for i, z in enumerate(logits)}
        heads.update(ensemble_heads(logits))
        return heads

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return self.branch_heads(self.net(images))

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_branch": [self.branch_name(i) for i in range(self.net.num_branches)]}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``branch_avg``: the mean accuracy of the branches (the OKDDip repo's checkpoint criterion)."""
        return average_accuracy(metrics, [self.branch_name(i) for i in range(self.net.num_branches)], "branch_avg")

    def deployable(self) -> nn.Module:
        """The trunk plus the deployed branch, as the plain backbone (``deploy.pt`` loads into ``create_model``)."""
        return self.net.single_branch(self.deploy_index)
