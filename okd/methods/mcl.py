"""MCL: Mutual Contrastive Learning (Yang, An, Cai, Xu, AAAI 2022), ``docs/methods.md#mcl``.

A cohort of N networks, each with an Embed head e_i = Embed_i(h_i) on its pooled penultimate feature h_i (not
detached). With S_ij = e_i e_j^T / tau, SC the supervised contrastive row loss and SKL the soft row loss of
``okd/nn/contrastive.py`` (target detached):

    L = sum_i CE(z_i, y) + L_KD + alpha * sum_i SC(S_ii) + gamma * sum_{i != j} SKL(S_ii <- S_jj)
        + beta * sum_{i < j} [SC(S_ij) + SC(S_ji)] + lam * sum_{i < j} [SKL(S_ij <- S_ji) + SKL(S_ji <- S_ij)]

one backward, one SGD over the networks and the heads. Defaults are the official CIFAR code's (winycg/MCL):
alpha = beta = 0.1, gamma = lam = 1, tau = 0.1, T = 3, D = 128. Its quirks are kept and named: N != 2 builds
one network with a shared trunk cut after stage 1 and N branches (``shared_trunk``, the README's MCL(x4)); the
same image seen by the other network is neither positive nor negative in SC(S_ij) (``icl_instance_positive``
is the opt-in alternative); the optional logit KD (``logit_distill``) distils the detached logit mean into the
last network only when N != 2 (``kd_last_net_only``). The batches must hold >= 2 images per class: train with
``data.sampler=m_per_class`` (the reference's sampler); the first batch of a process is checked (a loader without
class pairs is refused with a ``DataError``), later ones are left to the sampler (no host read per step).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import average_accuracy, check_int, ensemble_heads
from okd.models import create_model
from okd.models.members import head_labels
from okd.models.multibranch import MultiBranchNet, pool, stage1_split_for
from okd.models.taps import require_taps
from okd.nn.contrastive import EMBED_DIM, Embed, FirstBatchPositives, similarity, soft_contrast, sup_contrast
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean


@dataclass
class ContrastiveParams:
    """The knobs MCL and L-MCL share: the cohort size, the temperatures, the Embed width and the four weights."""

    #: N, the networks of the cohort: 2 (MCL(x2), every L-MCL cell) | 4 (MCL(x4))
    num_nets: int = 2
    #: tau, the contrastive temperature (0.1, code)
    tau: float = 0.1
    #: T, the temperature of the soft losses SKL and of the logit KD (3, code ``kd_T``)
    temperature: float = 3.0
    #: D, the width of the Embed heads (128, code ``feat_dim``)
    embed_dim: int = EMBED_DIM
    #: alpha, weight of VCL, the intra-network supervised contrast (0.1: MCL's README commands, L-MCL's defaults)
    vcl_weight: float = 0.1
    #: gamma, weight of soft VCL (1)
    soft_vcl_weight: float = 1.0
    #: beta, weight of ICL, the cross-network supervised contrast (0.1)
    icl_weight: float = 0.1
    #: lambda, weight of soft ICL (1)
    soft_icl_weight: float = 1.0
    #: which network ``deploy.pt`` holds (MCL's shared trunk: the trunk plus that branch; L-MCL: its backbone head)
    deploy_net: int = 0

    def validate(self) -> None:
        check_int("num_nets", self.num_nets, 2)
        check_int("embed_dim", self.embed_dim, 1)
        for key in ("tau", "temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key} must be positive, got {getattr(self, key)}")
        for key in ("vcl_weight", "soft_vcl_weight", "icl_weight", "soft_icl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.deploy_net < self.num_nets:
            raise ConfigError(f"method.deploy_net={self.deploy_net} is not a net; choose 0..{self.num_nets - 1}")


@dataclass
class MCLParams(ContrastiveParams):
    #: true (the code, [quirk]): N != 2 builds one network with a trunk shared up to stage 1 and N branches
    #: (MCL(x4) of the README); N = 2 is always two independent networks | false: N independent networks
    shared_trunk: bool = True
    #: false (code default) | true: KL_T from the detached logit mean (the README's "MCL(x4)+Logit KD" column)
    logit_distill: bool = False
    #: true (code, [quirk]): with N != 2 the logit KD trains the last network only | false: every network
    kd_last_net_only: bool = True
    #: false (code, [quirk]): in SC(S_ij) the same image's embedding by network j is neither positive nor
    #: negative | true: it is an extra positive and stays in the denominator
    icl_instance_positive: bool = False

    @property
    def uses_shared_trunk(self) -> bool:
        return self.shared_trunk and self.num_nets != 2


def mcl_contrast(embeddings: list[Tensor], labels: Tensor, hp: MCLParams) -> dict[str, Tensor]:
    """The four weighted contrastive totals of N embeddings (``contrast/vcl|soft_vcl|icl|soft_icl``).

    The labels must give every anchor a positive (``check_positives``; checked by the caller)."""
    n, tau, t = len(embeddings), hp.tau, hp.temperature
    sim = [[similarity(embeddings[i], embeddings[j], tau) for j in range(n)] for i in range(n)]
    vcl = sum(sup_contrast(sim[i][i], labels, check=False) for i in range(n))
    soft_vcl = sum(soft_contrast(sim[i][i], sim[j][j], t) for i in range(n) for j in range(n) if i != j)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    inst = hp.icl_instance_positive
    icl = sum(
        sup_contrast(sim[i][j], labels, instance_positive=inst, check=False)
        + sup_contrast(sim[j][i], labels, instance_positive=inst, check=False)
        for i, j in pairs
    )
    soft_icl = sum(soft_contrast(sim[i][j], sim[j][i], t) + soft_contrast(sim[j][i], sim[i][j], t) for i, j in pairs)
    return {
        "contrast/vcl": hp.vcl_weight * vcl,
        "contrast/soft_vcl": hp.soft_vcl_weight * soft_vcl,
        "contrast/icl": hp.icl_weight * icl,
        "contrast/soft_icl": hp.soft_icl_weight * soft_icl,
    }


def mcl_logit_kd(logits: list[Tensor], hp: MCLParams) -> dict[str, Tensor]:
    """``net<i>/kd``: KL_T(mean of logits, detached -> z_i), for every i, or only the last when N != 2 and
    ``kd_last_net_only`` (the code's rule)."""
    target = logit_mean(logits).detach()
    n = len(logits)
    students = [n - 1] if (n != 2 and hp.kd_last_net_only) else range(n)
    return {f"net{i}/kd": kl_div_t(logits[i], target, hp.temperature, detach_target=True) for i in students}


@register_method(
    "mcl",
    description="MCL: networks with embedding heads contrast their own and each other's embeddings (supervised "
    "and soft contrast); x4 shares a trunk up to stage 1",
    paper="Yang, An, Cai, Xu. Mutual Contrastive Learning for Visual Representation Learning. AAAI 2022",
)
class MCL(Method):
    Params = MCLParams
    mixed_cohort = (
        "the official MCL code trains copies of one network (its x4 cohort shares a trunk); the loss itself would "
        "take different networks, but no published MCL figure does"
    )
    cohort_key = "num_nets"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: MCLParams = self.hp
        self.networks = ctx.cohort(hp.num_nets)
        self.shared = hp.uses_shared_trunk
        if self.shared:
            if len({repr(m) for m in self.networks}) > 1:
                raise ConfigError(
                    "method.shared_trunk=true builds one network whose branches repeat the same stages, so its "
                    "cohort cannot mix networks; set method.shared_trunk=false for independent networks"
                )
            self.net = MultiBranchNet(ctx.model, ctx.num_classes, hp.num_nets, split=stage1_split_for)
            for branch in self.net.branches:  # the code's x4 classifiers keep PyTorch's default init (CRD WRN: its
                branch[self.net.split.head].reset_parameters()  # single network zeroes the bias; its x4 does not)
            dims = [self.net.feature_dim] * hp.num_nets
        else:
            self.nets = nn.ModuleList(create_model(m, ctx.num_classes) for m in self.networks)
            for net in self.nets:
                require_taps(net, "mcl (its embedding heads read the pooled deepest feature map)")
            dims = [int(net.tap_channels[-1]) for net in self.nets]
        self.embeds = nn.ModuleList(Embed(d, hp.embed_dim) for d in dims)
        self.deploy_head = f"net{hp.deploy_net}"
        self.check_first_batch = FirstBatchPositives()  # one host read, on the first batch

    def head_networks(self) -> dict[str, str]:
        return head_labels(self.net_names(), self.networks)

    def net_names(self) -> list[str]:
        return [f"net{i}" for i in range(self.hp.num_nets)]

    def param_groups(self) -> list[ParamGroup]:
        """One SGD over every network and Embed head, as the code's single optimizer."""
        return [sgd_group("cohort", self.parameters(), self.ctx.optim)]

    def forward_cohort(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Every network's logits z_i and pooled penultimate feature h_i."""
        if self.shared:
            out = self.net.forward_branches(images)
            return out.logits, out.features
        logits, feats = [], []
        for net in self.nets:
            z, taps = net.forward_taps(images)
            logits.append(z)
            feats.append(pool(taps[-1]))
        return logits, feats

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        self.check_first_batch(labels)
        logits, feats = self.forward_cohort(images)
        losses = {f"net{i}/ce": cross_entropy(z, labels) for i, z in enumerate(logits)}
        if self.hp.logit_distill:
            losses.update(mcl_logit_kd(logits, self.hp))
        embeddings = [embed(h) for embed, h in zip(self.embeds, feats, strict=True)]
        losses.update(mcl_contrast(embeddings, labels, self.hp))
        return losses

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """``net<i>`` per network, ``mean_logits`` (the code's "ensemble") and the softmax ``ensemble``."""
        logits = self.net(images) if self.shared else [net(images) for net in self.nets]
        heads = dict(zip(self.net_names(), logits, strict=True))
        heads.update(ensemble_heads(logits))
        return heads

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_net": self.net_names()}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``net_avg``: the mean of the networks' accuracies (honest); ``net_best_of_<N>``: the best network of
        this evaluation (selected on test), whose maximum over epochs is the code's reported metric."""
        names = self.net_names()
        out = average_accuracy(metrics, names, "net_avg")
        scores = [metrics.get(f"{h}/top1", -1.0) for h in names]
        best = max(range(len(names)), key=lambda i: scores[i])
        n = len(names)
        out[f"net_best_of_{n}/top1"] = scores[best]
        out[f"net_best_of_{n}/top5"] = metrics.get(f"{names[best]}/top5", -1.0)
        return out

    def deployable(self) -> nn.Module:
        """One network: ``net<deploy_net>``, or the shared trunk plus that branch as the plain backbone."""
        if self.shared:
            return self.net.single_branch(self.hp.deploy_net)
        return self.nets[self.hp.deploy_net]
