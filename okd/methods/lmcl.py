"""L-MCL: layer-wise mutual contrastive learning with meta-learned layer-pair weights (Yang et al., TPAMI 2023),
``docs/methods.md#lmcl``; defaults from the official CIFAR code (winycg/L-MCL).

``num_nets`` networks (2; ``model.members`` gives a heterogeneous pair, net 0 is the first member), each its
backbone plus two auxiliary branches (:class:`~okd.models.aux_branches.AuxBranchNet`): S = 3 heads per network
(aux1, aux2, backbone) with pooled features f_i^s and logits z_i^s, an Embed head per (network, head), an
aggregator per network and the loss-weight network phi. The main step minimises

    L = sum_{i,s} CE(z_i^s) + sum_i CE(zhat_i) + sum_{i,j} KL_T(zhat_j.detach() -> z_i^3)
        + alpha L_VCL + gamma L_SVCL + beta L_ICL + lambda L_SICL,

zhat_i the aggregated logit, the four contrastive totals summed over the ordered layer pairs with phi's weights
computed under no-grad. After the main step of every ``meta_every``-th batch of an epoch (from batch 0), a meta
round on the same batch (``okd/methods/lmcl_meta.py``) gives phi its hypergradient and one Nesterov SGD step.
The method steps its optimizers itself (``manual_step``): ``cohort`` (networks, Embed heads, aggregators) and
``loss_weights`` (phi), both at the run's lr schedule; the meta round's virtual optimiser uses the cohort's
current lr with plain momentum. Under DistributedDataParallel the main step's gradients are averaged by DDP and the
meta round's by the round itself (``okd/methods/lmcl_meta.py``); DDP leaves phi alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import average_accuracy, check_int
from okd.methods.lmcl_meta import Average, MetaSettings, hypergradient
from okd.methods.lmcl_net import Aggregator, LossWeightNetwork, ce, kl_t, layer_contrast
from okd.methods.mcl import ContrastiveParams
from okd.models.aux_branches import STAGES, AuxBranchNet
from okd.models.members import head_labels
from okd.nn.contrastive import Embed, FirstBatchPositives


@dataclass
class LMCLParams(ContrastiveParams):
    """MCL's knobs (every default is the L-MCL script's) and the meta round's."""

    #: 50 (--meta-freq: a meta round after the main step of batches 0, 50, 100, ... of each epoch) | 0 (never)
    meta_every: int = 50
    #: 2 (--times: inner virtual steps before the virtual step on the outer objective)
    inner_steps: int = 2
    #: true (the code: the adjoint adds a_1 without the weight-decay factor) | false (the exact adjoint)
    meta_adjoint_wd_bug: bool = True
    #: true (the code: BN running statistics gain one update at theta_0 per meta round) | false (left untouched)
    meta_bn_side_effect: bool = True

    def validate(self) -> None:
        super().validate()
        check_int("meta_every", self.meta_every, 0)
        check_int("inner_steps", self.inner_steps, 1)


def head_name(i: int, s: int) -> str:
    """``net<i>`` for the backbone head, ``net<i>_aux1`` / ``net<i>_aux2`` for the branches."""
    return f"net{i}" if STAGES[s] == "backbone" else f"net{i}_{STAGES[s]}"


@register_method(
    "lmcl",
    description="L-MCL: networks with two auxiliary heads each; layer-pair contrastive learning weighted by a "
    "meta-learned network, CE on every head and on aggregated logits, KD into the final heads",
    paper="Yang et al. Online Knowledge Distillation via Mutual Contrastive Learning for Visual Recognition. "
    "TPAMI 2023 (arXiv 2207.11518)",
)
class LMCL(Method):
    Params = LMCLParams
    mixed_cohort = None  # any networks with a stage cut (okd/models/aux_branches.py): they meet only in the losses
    cohort_key = "num_nets"
    ddp_manual_step = True  # the main step's forward goes through runner.model; the meta round averages its own

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp = self.hp
        self.networks = ctx.cohort(hp.num_nets)
        self.nets = nn.ModuleList(AuxBranchNet(m, ctx.num_classes) for m in self.networks)
        dims = [[net.feature_dim] * len(STAGES) for net in self.nets]
        self.embeds = nn.ModuleList(nn.ModuleList(Embed(d, hp.embed_dim) for d in row) for row in dims)
        self.aggregators = nn.ModuleList(Aggregator(row[0], len(STAGES)) for row in dims)
        self.weight_net = LossWeightNetwork(dims)
        self.check_first_batch = FirstBatchPositives()  # one host read, on the first batch
        self.deploy_head = head_name(hp.deploy_net, len(STAGES) - 1)
        # the epoch the step counter counts in, the batch index within it, the meta rounds so far (resumed)
        self.register_buffer("step_epoch", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("step_in_epoch", torch.tensor(0, dtype=torch.long))
        self.register_buffer("meta_rounds", torch.tensor(0, dtype=torch.long))

    # ------------------------------------------------------------------------------------------ cohort
    @property
    def deployed_member(self) -> int:
        return self.hp.deploy_net

    def head_networks(self) -> dict[str, str]:
        heads = [head_name(i, s) for i in range(len(self.nets)) for s in range(len(STAGES))]
        return head_labels(heads, [m for m in self.networks for _ in STAGES])

    def param_groups(self) -> list[ParamGroup]:
        cohort = [*self.nets.parameters(), *self.embeds.parameters(), *self.aggregators.parameters()]
        return [
            sgd_group("cohort", cohort, self.ctx.optim),
            sgd_group("loss_weights", self.weight_net.parameters(), self.ctx.optim),
        ]

    def ddp_ignored_parameters(self) -> list[str]:
        """phi: no gradient in the main step; the meta round averages its gradient over the processes itself."""
        return [f"weight_net.{n}" for n, _ in self.weight_net.named_parameters()]

    def theta(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """The meta round's theta: every parameter of the networks and Embed heads, as (module, name, param)."""
        mods = [*self.nets, *(e for row in self.embeds for e in row)]
        return [(m, n, p) for m in mods for n, p in m.named_parameters()]

    # ------------------------------------------------------------------------------------------ losses
    def forward_all(self, images: Tensor) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        outs = [net(images) for net in self.nets]
        return [f for f, _ in outs], [z for _, z in outs]

    def embed(self, features: list[list[Tensor]]) -> list[list[Tensor]]:
        return [[e(f) for e, f in zip(row, fs, strict=True)] for row, fs in zip(self.embeds, features, strict=True)]

    def contrast_losses(self, embeddings, labels: Tensor, weights: list[Tensor]) -> dict[str, Tensor]:
        """The four weighted contrastive totals, by name (weights applied)."""
        hp = self.hp
        vcl, svcl, icl, sicl = layer_contrast(embeddings, labels, weights, hp.tau, hp.temperature)
        return {
            "contrast/vcl": hp.vcl_weight * vcl,
            "contrast/soft_vcl": hp.soft_vcl_weight * svcl,
            "contrast/icl": hp.icl_weight * icl,
            "contrast/soft_icl": hp.soft_icl_weight * sicl,
        }

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """The main step's loss terms (phi's weights constant)."""
        self.check_first_batch(labels)
        features, logits = self.forward_all(images)
        with torch.no_grad():
            weights = self.weight_net(features)
        losses: dict[str, Tensor] = {}
        for i, zs in enumerate(logits):
            for s, z in enumerate(zs):
                losses[f"net{i}/ce_{STAGES[s]}"] = ce(z, labels)
        aggregated = [agg(f, z) for agg, f, z in zip(self.aggregators, features, logits, strict=True)]
        for i, zhat in enumerate(aggregated):
            losses[f"net{i}/ce_aggregated"] = ce(zhat, labels)
        for i, zs in enumerate(logits):
            losses[f"net{i}/kd"] = sum(kl_t(zs[-1], zhat, self.hp.temperature) for zhat in aggregated)
        losses.update(self.contrast_losses(self.embed(features), labels, weights))
        losses["stat/pair_weight_mean"] = torch.stack(weights).mean().detach().float()
        return losses

    def inner_objective(self, theta: list[Tensor], images: Tensor, labels: Tensor) -> Tensor:
        """L_in(theta, phi): the weighted contrastive terms, phi's weights computed with gradient."""
        features, _ = self._functional_forward(theta, images)
        weights = self.weight_net(features)
        return sum(self.contrast_losses(self._functional_embed(theta, features), labels, weights).values())

    def outer_objective(self, theta: list[Tensor], images: Tensor, labels: Tensor) -> Tensor:
        """L_out(theta): CE of every head of every network."""
        _, logits = self._functional_forward(theta, images)
        return sum(ce(z, labels) for zs in logits for z in zs)

    def _bound(self, theta: list[Tensor]) -> dict[int, dict[str, Tensor]]:
        out: dict[int, dict[str, Tensor]] = {}
        for (m, n, _), t in zip(self.theta(), theta, strict=True):
            out.setdefault(id(m), {})[n] = t
        return out

    def _functional_forward(self, theta: list[Tensor], images: Tensor):
        bound = self._bound(theta)
        outs = [functional_call(net, bound[id(net)], (images,), strict=False) for net in self.nets]
        return [f for f, _ in outs], [z for _, z in outs]

    def _functional_embed(self, theta: list[Tensor], features: list[list[Tensor]]) -> list[list[Tensor]]:
        bound = self._bound(theta)
        return [
            [functional_call(e, bound[id(e)], (f,)) for e, f in zip(row, fs, strict=True)]
            for row, fs in zip(self.embeds, features, strict=True)
        ]

    # ------------------------------------------------------------------------------------------ optimisation
    @property
    def manual_optimization(self) -> bool:
        return self.hp.meta_every > 0

    def manual_step(self, images: Tensor, labels: Tensor, epoch: int, runner) -> dict[str, Tensor]:
        """The main step (optimizer 0), then the meta round on the same batch when this batch index is due."""
        losses = runner.model(images, labels, epoch)  # training_step, through the DDP wrapper when there is one
        runner.zero_grad(0)
        runner.backward(sum(v for k, v in losses.items() if not k.startswith("stat/")))
        runner.step_optimizer(0)
        if int(self.step_epoch) != epoch:
            self.step_epoch.fill_(epoch)
            self.step_in_epoch.zero_()
        if int(self.step_in_epoch) % self.hp.meta_every == 0:
            lr = float(runner.optimizers[0].param_groups[0]["lr"])
            self.meta_step(images, labels, lr, runner.optimizers[1], runner.average_across_processes)
        self.step_in_epoch.add_(1)
        return {k: v.detach() for k, v in losses.items()}

    def meta_settings(self, lr: float) -> MetaSettings:
        optim = self.ctx.optim
        return MetaSettings(lr, optim.momentum, optim.weight_decay, self.hp.inner_steps, self.hp.meta_adjoint_wd_bug)

    def meta_step(
        self, images: Tensor, labels: Tensor, lr: float, weight_optimizer, average: Average | None = None
    ) -> Tensor:
        """One meta round: phi's hypergradient into ``phi.grad``, one step of ``weight_optimizer``; returns
        L_out(theta_3). The networks stay at theta_0; BN statistics as ``meta_bn_side_effect`` says (this process's
        shard under DDP). ``average``: the mean over the processes (``hypergradient``), None in one process."""
        buffers = [b for net in self.nets for b in net.buffers()]
        before = [b.clone() for b in buffers]
        after_first: list[Tensor] = []

        def record() -> None:
            after_first.extend(b.clone() for b in buffers)

        phi = list(self.weight_net.parameters())
        grads, outer = hypergradient(
            [p for _, _, p in self.theta()],
            phi,
            lambda th: self.inner_objective(th, images, labels),
            lambda th: self.outer_objective(th, images, labels),
            self.meta_settings(lr),
            after_first_forward=record,
            average=average,
        )
        with torch.no_grad():
            for b, saved in zip(buffers, after_first if self.hp.meta_bn_side_effect else before, strict=True):
                b.copy_(saved)
        for p, g in zip(phi, grads, strict=True):
            p.grad = g.to(p.dtype)
        weight_optimizer.step()
        self.meta_rounds.add_(1)
        return outer

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        _, logits = self.forward_all(images)
        return {head_name(i, s): z for i, zs in enumerate(logits) for s, z in enumerate(zs)}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``net_avg``: the mean of the backbone heads (the honest per-network figure); ``net<i>_max_heads``: the
        best of network i's three heads at this evaluation (its max over epochs is the code's ``best_accs[i]``);
        ``best_head``: the best head of every network (its max over epochs is the code's ``best_accuracy``)."""
        n = len(self.nets)
        out = average_accuracy(metrics, [f"net{i}" for i in range(n)], "net_avg")
        for k in ("top1", "top5"):
            per_net = []
            for i in range(n):
                values = [metrics.get(f"{head_name(i, s)}/{k}") for s in range(len(STAGES))]
                if all(v is not None for v in values):
                    out[f"net{i}_max_heads/{k}"] = max(values)
                    per_net.append(max(values))
            if len(per_net) == n:
                out[f"best_head/{k}"] = max(per_net)
        return out

    def deployable(self) -> nn.Module:
        return self.nets[self.hp.deploy_net].backbone
