"""PCL: Peer Collaborative Learning (Wu & Gong, AAAI 2021), as in shaoeric's reproduction (``docs/methods.md#pcl``).

A multi-branch network (branch split, ``num_branches`` = 3 peers). **Each branch gets its own augmented view**
(``views`` = 3): the trunk runs once per view, branch i on view i. The **peer ensemble teacher** is a Linear
(m·d -> K) on the concatenated pooled branch features (not detached: its CE trains the branches and the
trunk). The **peer mean teacher** is an EMA copy of the whole network (branches, trunk and ensemble Linear):
parameters only, theta' <- alpha theta' + (1 - alpha) theta with alpha = min(1 - 1/(t+1), ema_decay) after
every optimizer step (t = the global step, so t = 0 copies the network). The EMA copy has its own random init
(used, as in the reproduction, for the forward of step 0 only), runs in **train mode** on the same views under
no-grad, so its BN layers use batch statistics and keep their own running buffers (never averaged). With T = 3:

    L = CE(z_pe) + sum_i [ CE(z_i) + w(e) KL_T(z_pe.detach() -> z_i) + w(e) 1/(m-1) sum_{j != i} KL_T(zt_j -> z_i) ]

zt_j = the EMA branch j on view j. w(e) = kl_weight * exp(-5 (1 - e/80)^2) (0-based epoch, 1 from epoch 80);
``rampup_divides_by_lambda_bug=true`` reproduces the reproduction's ramp-up instead (it divides the
clipped epoch by lambda = 1 instead of by 80, so w = e^-5, 1, e^-5, ~0 ... ~0 for epochs 0, 1, 2, 3..80 and 1
from 81 on; its README numbers were produced with it).

Heads: ``branch<i>``, ``peer_ensemble`` (z_pe), ``mean_logits``/``ensemble`` of the branches, ``ema_branch<i>``
and ``ema_mean_logits``/``ema_ensemble``. ``deploy.pt`` holds the mean-teacher trunk plus mean-teacher branch
``deploy_branch`` (the PCL paper: branch 1, index 0). The reproduction instead reports the best of the three
EMA branches on the test split each epoch (optimistic): :meth:`PCL.derived_metrics` gives it as
``ema_best_of_<m>``, and ``deploy_best_of_branches=true`` deploys and selects ``best.pt`` on it (the trainer
calls that hook after every evaluation).

Known difference: the reproduction's DenseNet-BC branches have no final BN (dense block -> ReLU -> pool -> fc,
``docs/models.md#densenets``); :class:`~okd.models.multibranch.MultiBranchNet` keeps it (2 x 132 more parameters
per branch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import check_distillation, check_dropout, check_int, ensemble_heads, scalar
from okd.models.multibranch import MultiBranchNet
from okd.nn.losses import cross_entropy, kl_div_t, rampup_0based


@dataclass
class PCLParams:
    num_branches: int = 3
    #: dropout of branch classifiers that have one (VGG-16: 0 in the PCL files); null keeps the backbone's
    dropout: float | None = 0.0
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    #: the reproduction's ramp-up bug (divides the clipped epoch by lambda = 1 instead of by the ramp length)
    rampup_divides_by_lambda_bug: bool = False
    #: the cap of the EMA decay alpha = min(1 - 1/(t+1), ema_decay)
    ema_decay: float = 0.999
    #: the reproduction's init quirk: every branch classifier starts as a copy of branch 0's (off: independent)
    copy_branch0_classifier_init: bool = False
    #: which mean-teacher branch ``deploy.pt`` holds, with the mean-teacher trunk (PCL paper: branch 1 = 0)
    deploy_branch: int = 0
    #: the reproduction's protocol: deploy (and select best.pt on) the best EMA branch on the test split
    deploy_best_of_branches: bool = False

    def validate(self) -> None:
        check_int("num_branches", self.num_branches, 2)
        check_distillation(self.temperature, self.kl_weight, self.rampup_length)
        check_dropout(self.dropout)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"method.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.deploy_branch < self.num_branches:
            raise ConfigError(
                f"method.deploy_branch={self.deploy_branch} is not a branch; choose 0..{self.num_branches - 1}"
            )


def pcl_rampup(epoch: int, length: int = 80, divides_by_lambda_bug: bool = False) -> float:
    """The PCL ramp-up factor (without the KL weight) of the 0-based ``epoch``.

    Correct: exp(-5 (1 - clip(e, 0, L)/L)^2). Bug (the reproduction): 1 for e > L, else
    exp(-5 (1 - clip(e, 0, L)/1)^2).
    """
    if not divides_by_lambda_bug:
        return rampup_0based(epoch, length)
    if epoch > length:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(length)) / 1.0
    return math.exp(-5.0 * phase * phase)


def ema_alpha(step: int, cap: float = 0.999) -> float:
    """alpha = min(1 - 1/(t+1), cap) for the 0-based global step t (0 at t = 0: the copy)."""
    return min(1.0 - 1.0 / (step + 1.0), cap)


@torch.no_grad()
def ema_update(ema_params: list[Tensor], params: list[Tensor], alpha: float) -> None:
    """theta' <- alpha theta' + (1 - alpha) theta, in place, for every pair."""
    torch._foreach_mul_(ema_params, alpha)
    torch._foreach_add_(ema_params, params, alpha=1.0 - alpha)


def as_views(images: Tensor | list[Tensor], count: int, what: str) -> list[Tensor]:
    """The first ``count`` views of a multi-view batch (a list); a clear error when there are too few."""
    if isinstance(images, Tensor) or len(images) < count:
        got = 1 if isinstance(images, Tensor) else len(images)
        raise ValueError(
            f"{what} needs {count} independently augmented views per batch (a list of {count} tensors), got {got}; "
            "the trainer must build the loader with the method's views_for(params)"
        )
    return list(images[:count])


class PeerNet(nn.Module):
    """A multi-branch network plus the peer-ensemble Linear on its concatenated pooled branch features."""

    def __init__(self, model: str, num_classes: int, num_branches: int, dropout: float | None) -> None:
        super().__init__()
        self.net = MultiBranchNet(model, num_classes, num_branches, dropout=dropout)
        self.peer_fc = nn.Linear(num_branches * self.net.feature_dim, num_classes)

    def forward_views(self, views: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Branch i on view i (the trunk runs once per view). Returns (logits, pooled features) per branch."""
        feats = [self.net.branch_features(self.net.trunk(x), i) for i, x in enumerate(views)]
        return [self.net.branch_logits(f, i) for i, f in enumerate(feats)], feats

    def peer_logits(self, feats: list[Tensor]) -> Tensor:
        """z_pe = Linear(concat_i h_i)."""
        return self.peer_fc(torch.cat(feats, dim=1))

    def forward_single(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every branch on one batch (trunk once) and the peer-ensemble logits."""
        out = self.net.forward_branches(x)
        return out.logits, self.peer_logits(out.features)


def pcl_kl_weight(hp: PCLParams, epoch: int) -> float:
    """The KL weight of ``epoch``: ``kl_weight`` times PCL's ramp-up."""
    return hp.kl_weight * pcl_rampup(epoch, hp.rampup_length, hp.rampup_divides_by_lambda_bug)


def pcl_losses(
    logits: list[Tensor],
    peer: Tensor,
    ema_logits: list[Tensor],
    labels: Tensor,
    hp: PCLParams,
    epoch: int,
    w: float | None = None,
) -> dict[str, Tensor]:
    """PCL's named loss terms (weights applied). Every KL target is detached. ``w``: the KL weight of ``epoch``
    when the caller computed it (:meth:`PCL.epoch_scalars`)."""
    m, T = len(logits), hp.temperature
    if w is None:
        w = pcl_kl_weight(hp, epoch)
    losses: dict[str, Tensor] = {"peer_ensemble/ce": cross_entropy(peer, labels)}
    for i, z in enumerate(logits):
        losses[f"branch{i}/ce"] = cross_entropy(z, labels)
        losses[f"branch{i}/kl_peer"] = w * kl_div_t(z, peer, T, detach_target=True)
        mt = [kl_div_t(z, zt, T, detach_target=True) for j, zt in enumerate(ema_logits) if j != i]
        losses[f"branch{i}/kl_mean_teacher"] = w * sum(mt) / (m - 1)
    losses["stat/kl_weight"] = scalar(w, peer)
    return losses


@register_method(
    "pcl",
    description="PCL: 3 branches on 3 views, a peer-ensemble Linear teacher and an EMA peer mean teacher",
    paper="Wu, Gong. Peer Collaborative Learning for Online Knowledge Distillation. AAAI 2021",
)
class PCL(Method):
    Params = PCLParams
    views = 3
    mixed_cohort = (
        "its peers are the branches of one multi-branch network over a shared trunk, with a temporal-mean (EMA) "
        "copy of that network, so every peer is the same network"
    )
    cohort_key = "num_branches"

    @classmethod
    def views_for(cls, params: PCLParams) -> int:
        """One view per branch."""
        return params.num_branches

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: PCLParams = ctx.params
        self.num_branches = hp.num_branches
        self.student = PeerNet(ctx.model, ctx.num_classes, hp.num_branches, hp.dropout)
        if hp.copy_branch0_classifier_init:
            head = self.student.net.split.head
            for branch in self.student.net.branches[1:]:
                branch[head].load_state_dict(self.student.net.branches[0][head].state_dict())
        self.ema = PeerNet(ctx.model, ctx.num_classes, hp.num_branches, hp.dropout)  # own init (step 0 only)
        self.ema.requires_grad_(False)
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_branch", torch.tensor(hp.deploy_branch, dtype=torch.long))
        self._step_cache: int | None = None
        self.register_load_state_dict_post_hook(_forget_step_cache)
        if hp.deploy_best_of_branches:
            self.deploy_head = f"ema_best_of_{hp.num_branches}"
        else:
            self.deploy_head = f"ema_branch{hp.deploy_branch}"

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group("net", self.student.parameters(), self.ctx.optim)]

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return {"kl_weight": pcl_kl_weight(self.hp, epoch)}

    def training_step(
        self, images: Tensor | list[Tensor], labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        s = self.scalars_at(epoch, scalars)
        views = as_views(images, self.num_branches, "PCL")
        logits, feats = self.student.forward_views(views)
        peer = self.student.peer_logits(feats)
        with torch.no_grad():
            ema_logits, _ = self.ema.forward_views(views)
        return pcl_losses(logits, peer, ema_logits, labels, self.hp, epoch, w=s["kl_weight"])

    def after_optimizer_step(self) -> None:
        """The mean-teacher update of global step t (then t += 1); the step lives in the ``ema_step`` buffer."""
        if self._step_cache is None:
            self._step_cache = int(self.ema_step)
        t = self._step_cache
        ema_update(list(self.ema.parameters()), list(self.student.parameters()), ema_alpha(t, self.hp.ema_decay))
        self._step_cache = t + 1
        self.ema_step.fill_(t + 1)

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        logits, peer = self.student.forward_single(images)
        ema_logits = self.ema.net(images)
        heads = {f"branch{i}": z for i, z in enumerate(logits)}
        heads["peer_ensemble"] = peer
        heads.update(ensemble_heads(logits))
        heads.update({f"ema_branch{i}": z for i, z in enumerate(ema_logits)})
        heads.update(ensemble_heads(ema_logits, prefix="ema_"))
        return heads

    def oracle_groups(self) -> dict[str, list[str]]:
        m = self.num_branches
        return {
            "oracle_any_branch": [f"branch{i}" for i in range(m)],
            "oracle_any_ema_branch": [f"ema_branch{i}" for i in range(m)],
        }

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``ema_best_of_<m>/top1|top5``: the EMA branch with the best test top-1 of this evaluation (the
        reproduction's optimistic protocol, selected on the test split); remembers it for :meth:`deployable`."""
        m = self.num_branches
        scores = [metrics.get(f"ema_branch{i}/top1", -1.0) for i in range(m)]
        best = max(range(m), key=lambda i: scores[i])
        if self.hp.deploy_best_of_branches:
            self.best_branch.fill_(best)
        return {
            f"ema_best_of_{m}/top1": scores[best],
            f"ema_best_of_{m}/top5": metrics.get(f"ema_branch{best}/top5", -1.0),
        }

    def deployable(self) -> nn.Module:
        """The mean-teacher trunk plus one mean-teacher branch, as the plain backbone."""
        index = int(self.best_branch) if self.hp.deploy_best_of_branches else self.hp.deploy_branch
        return self.ema.net.single_branch(index)


def _forget_step_cache(module: PCL, incompatible_keys) -> None:
    module._step_cache = None
