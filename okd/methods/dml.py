"""DML: Deep Mutual Learning (Zhang et al., CVPR 2018), ``docs/methods.md#dml``.

``num_nets`` independent networks, of any architectures (``model.members``: net i is member i); net i minimises

    L_i = CE(z_i, y) + kl_weight * (1/(M-1)) sum_{j != i} KL_T(z_j -> z_i)        (target='pairwise')
    L_i = CE(z_i, y) + kl_weight * KL_T(mean_{j != i} z_j -> z_i)                 (target='mean_of_others')

with T^2 scaling inside KL_T. Default: the canonical form (detached peer targets, one optimizer group per
net, every net's loss from one shared forward; with detached targets one backward of the summed loss equals
per-net steps). The OKDDip-repo variant is ``num_nets=4 detach_targets=false target=mean_of_others
target_eps=1e-7`` (T = 3 is the default here too); it used one joint backward, which is what the trainer does.

``alternate_updates=true`` is the DML paper's algorithm: within a step, net 0 computes its loss against the
peers' current predictions and steps; then the peers' predictions are recomputed (no grad) and net 1 steps,
and so on (the method drives its optimizers through ``manual_step``; single process only). The peers'
recomputed forwards run in train mode, as in the paper's loop, so their BatchNorm running statistics see
each batch once per net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import average_accuracy, check_choice, check_distillation, check_int, ensemble_heads
from okd.models import create_model
from okd.models.members import head_labels
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean


@dataclass
class DMLParams:
    num_nets: int = 2
    temperature: float = 3.0
    kl_weight: float = 1.0
    #: true: peers' predictions are fixed targets (canonical); false: the OKDDip repo's graph-keeping targets
    detach_targets: bool = True
    #: pairwise (mean of the KLs to each peer) | mean_of_others (KL to the mean of the peers' logits)
    target: str = "pairwise"
    scale_t2: bool = True
    target_eps: float = 0.0
    #: which net ``deploy.pt`` holds
    deploy_net: int = 0
    #: the DML paper's alternating updates: net i steps before net i+1 recomputes its targets
    alternate_updates: bool = False

    def validate(self) -> None:
        check_int("num_nets", self.num_nets, 2)
        check_choice("target", self.target, ("pairwise", "mean_of_others"))
        check_distillation(self.temperature, self.kl_weight, 0, self.target_eps)
        if self.alternate_updates and not self.detach_targets:
            raise ConfigError(
                "method.alternate_updates=true recomputes the peers' predictions as fixed targets; "
                "it needs method.detach_targets=true"
            )
        if not 0 <= self.deploy_net < self.num_nets:
            raise ConfigError(f"method.deploy_net={self.deploy_net} is not a net; choose 0..{self.num_nets - 1}")


def dml_kl(logits: list[Tensor], i: int, hp: DMLParams) -> Tensor:
    """Net i's mutual-learning term (unweighted), per ``hp.target``."""
    T, eps, detach = hp.temperature, hp.target_eps, hp.detach_targets
    others = [z for j, z in enumerate(logits) if j != i]
    if hp.target == "mean_of_others":
        return kl_div_t(logits[i], logit_mean(others), T, detach_target=detach, scale_t2=hp.scale_t2, target_eps=eps)
    terms = [kl_div_t(logits[i], z, T, detach_target=detach, scale_t2=hp.scale_t2, target_eps=eps) for z in others]
    return sum(terms) / len(terms)


def dml_losses(logits: list[Tensor], labels: Tensor, hp: DMLParams, prefix: str = "net") -> dict[str, Tensor]:
    """Every net's CE and weighted mutual-learning KL, named ``<prefix><i>/ce`` and ``<prefix><i>/kl``."""
    losses: dict[str, Tensor] = {}
    for i, z in enumerate(logits):
        losses[f"{prefix}{i}/ce"] = cross_entropy(z, labels)
        losses[f"{prefix}{i}/kl"] = hp.kl_weight * dml_kl(logits, i, hp)
    return losses


@register_method(
    "dml",
    description="DML: independent networks learn from each other's predictions (KL at T, detached by default)",
    paper="Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018",
)
class DML(Method):
    Params = DMLParams
    mixed_cohort = None  # any networks: only their logits meet
    cohort_key = "num_nets"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.networks = ctx.cohort(self.hp.num_nets)
        self.nets = nn.ModuleList(create_model(model, ctx.num_classes) for model in self.networks)
        self.deploy_head = f"net{self.hp.deploy_net}"

    @property
    def deployed_member(self) -> int:
        return self.hp.deploy_net

    def head_networks(self) -> dict[str, str]:
        return head_labels([f"net{i}" for i in range(len(self.nets))], self.networks)

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group(f"net{i}", net.parameters(), self.ctx.optim) for i, net in enumerate(self.nets)]

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        return dml_losses([net(images) for net in self.nets], labels, self.hp)

    @property
    def manual_optimization(self) -> bool:
        return self.hp.alternate_updates

    def manual_step(self, images: Tensor, labels: Tensor, epoch: int, runner) -> dict[str, Tensor]:
        """Alternating updates: net i's loss uses the peers' predictions after nets 0..i-1 have stepped."""
        losses: dict[str, Tensor] = {}
        for i, net in enumerate(self.nets):
            with torch.no_grad():
                logits = [None if j == i else peer(images) for j, peer in enumerate(self.nets)]
            logits[i] = net(images)
            ce = cross_entropy(logits[i], labels)
            kl = self.hp.kl_weight * dml_kl(logits, i, self.hp)
            runner.zero_grad(i)
            runner.backward(ce + kl)
            runner.step_optimizer(i)
            losses[f"net{i}/ce"], losses[f"net{i}/kl"] = ce.detach(), kl.detach()
        return losses

    def net_heads(self, logits: list[Tensor]) -> dict[str, Tensor]:
        heads = {f"net{i}": z for i, z in enumerate(logits)}
        heads.update(ensemble_heads(logits))
        return heads

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return self.net_heads([net(images) for net in self.nets])

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_net": [f"net{i}" for i in range(len(self.nets))]}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``net_avg``: the mean accuracy of the nets (FFSD's "2-net average"; the OKDDip repo's criterion)."""
        return average_accuracy(metrics, [f"net{i}" for i in range(len(self.nets))], "net_avg")

    def deployable(self) -> nn.Module:
        return self.nets[self.hp.deploy_net]
