"""CMFF: self-supervised learning and cross-modal feature fusion (official code Coralmss/CMFF;
``docs/methods.md#cmff``).

The released code is internally inconsistent; okd builds the design of the README's example (``train_vgg.py``
with ``CrossVGG16``) and carries the same recipe to the CIFAR and ImageNet/TinyImageNet ResNets. Every choice
the release leaves open is a documented decision ("Decisions" below).

This file holds the method: its parameters, the loss, the training and evaluation steps, the optimizer groups
and the registration. The network is :class:`okd.methods.cmff_net.CMFFNet` (per-backbone stage access in
:mod:`okd.models.cmff_backbone`), the rotation expansion and the similarity CE are in :mod:`okd.nn.rotation`,
the cross-attention and the fusion module in :mod:`okd.nn.cross_attention` and :mod:`okd.nn.fusion`.

**Graph.** Two networks of the same backbone, net 1 and net 2, built as two plain registered backbones:

- **Stem**, shared (``share_stem``, default true): one stem computed once and fed to both nets.
  ``cmff_vgg16``: conv3x3(3->64)-BN-ReLU-conv3x3(64->64)-BN-ReLU-maxpool (-> 64x16x16); CIFAR ResNets:
  conv3x3(3->16)-BN-ReLU; ImageNet ResNets: conv7x7/2-BN-ReLU-maxpool (or the CIFAR stem of ``*_cifar_stem``).
- **Stages**, per net: ``cmff_vgg16`` has 4 stages of 3 x [conv3x3(bias)-BN-ReLU] + maxpool with 128, 256, 512,
  512 channels (so stage 1 has 3 convs: 14 convs per net, not VGG-16's 13, ``docs/models.md``); a CIFAR ResNet
  has its ``layer1..3``, an ImageNet ResNet its ``layer1..4``.
- **Classifier**: ``cmff_vgg16``: flatten 512x1x1 -> Linear 512-512-K (ReLU, Dropout(``dropout``) after the
  first two); ResNets: global average pool -> Linear(C -> K). ``shared_classifier`` (default: true for the VGG,
  as released; false for the ResNets, as the released ``cross_resnet`` with its ``fc1``/``fc2``) makes net 2
  use net 1's classifier.
- **Cross-stage knowledge projections**, per net: for every stage s before a (a = ``aux_stage``, default 2),
  P^i_{s->a} = ReLU(BN(Conv(k = stride = f_{s,a}, no bias)(h^i_s))) with f_{s,a} the spatial downscale from
  stage s to stage a (C_s -> C_a channels); h^i_s is net i's output of stage s. The **fused knowledge** at stage a is
  kappa^i = h^i_a + sum_{s < a} P^i_{s->a}(h^i_s). It feeds only the auxiliary heads, never the next stage.
- **Self-supervised rotation** (training only; ``self_supervision``, default true): the batch x (B images) is
  expanded to 4B images x~_{4b+r} = rot90(x_b, r) (r = 0..3 quarter turns counter-clockwise in the H-W plane,
  ``torch.rot90(x, r, (2, 3))``), interleaved per sample, with joint labels y~_{4b+r} = 4 y_b + r. Both nets
  (all stages, all BN layers) run on the 4B images; the main classifiers, the cross-attention and the fusion
  module see only the unrotated quarter (rows 0, 4, 8, ...).
- **Auxiliary head 1** (net 1): g_1 = MLP(flatten(kappa^1)) with widths D -> D/2 -> D/4 -> 4K (ReLU and
  Dropout(``dropout``) between; D = C_a H_a W_a = 512*2*2 = 2048 for the VGG, so 2048-1024-512-4K as released);
  ``rot_hidden`` overrides the hidden widths.
- **Auxiliary head 2** (net 2): a projection u = Linear(P -> P)(ReLU(Linear(D -> P)(flatten(kappa^2)))) with
  P = ``proj_dim`` (default D: 2048-2048-2048 for the VGG, as released).
- **Cross-attention** (``okd.nn.cross_attention.CrossAttentionFusion``) between the two nets' final features
  f_i (the classifier inputs: 512-d for the VGG, the pooled C-d vector for the ResNets), 4 heads, both
  directions, pre-LayerNorm, residuals with learnable scalars (init 1), GELU MLP (x``attn_mlp_ratio`` = 2),
  dropout 0.1 -> (f'_1, f'_2).
- **Fusion module**: FFL's ``FusionModule`` (``okd.nn.fusion``; depthwise 3x3 -> BN -> ReLU -> 1x1 2C -> C -> BN
  -> ReLU -> GAP -> Linear(C -> K)) on concat(f'_1, f'_2) as 2C x 1 x 1 maps -> z_f. Its input is **not**
  detached (``detach_fusion_input`` = false), so CE(z_f) and the KL terms into z_f train both nets and the stem.

**Loss** (0-based epoch e; KL_T(t -> s) of ``docs/methods.md`` (notation) with T = ``temperature`` = 3, the target
**detached** and 1e-7 (``target_eps``) added to it, as the released ``KLLoss``):

    L = CE(z_1, y) + CE(z_2, y) + CE(z_f, y)
        + kl_weight * w(e; 80) * [ KL_T(z_2 -> z_1) + KL_T(z_1 -> z_2) + KL_T(z_f -> z_1)
                                   + KL_T(z_f -> z_2) + KL_T(z_1 -> z_f) + KL_T(z_2 -> z_f) ]
        + rot_weight * CE(g_1, y~) + sim_weight * L_sim,           rot_weight = 1, sim_weight = 5,

    L_sim = (1 / 3B) sum_b sum_{r=1..3} -log softmax_j( cos(u_{4b+r}, u_{4j}) / tau )_{j = b},   tau = 1,

i.e. every rotated view (r = 1, 2, 3) is a query, the B unrotated views are the candidates, and the target is
the query's own source image; the unrotated views are not queries (as released). tau = ``sim_temperature``
(the release has none, i.e. 1). w(e; L) = exp(-5 (1 - clip(e, 0, L)/L)^2), L = ``rampup_length`` = 80.
Loss-dict keys: ``net1/ce``, ``net2/ce``, ``fusion/ce``, ``net1/kl_net2`` (= w KL_T(z_2 -> z_1)),
``net1/kl_fusion``, ``net2/kl_net1``, ``net2/kl_fusion``, ``fusion/kl_net1``, ``fusion/kl_net2``,
``net1/rot_ce`` (weighted), ``net2/sim_ce`` (weighted); ``stat/kl_weight``.

**Gradient paths** (by construction; tested): CE_rot reaches head 1, net 1's stages up to a, its projections
and the stem, nothing of net 2; L_sim the same for net 2 and head 2; CE(z_f) reaches the fusion module, the
cross-attention, every stage of both nets and the stem (not the classifiers); a KL term reaches only its
student's path.

**Optimisation.** Group ``net`` (everything but the fusion module: stem, nets, projections, auxiliary heads,
cross-attention; it sits inside the released model): SGD Nesterov with the run's lr, momentum and weight decay
(the configs: 0.1, 0.9, 2e-4). Group ``fusion``: SGD with weight decay ``fusion_weight_decay`` = 1e-5. The
release comments out the fusion scheduler's step, so its lr stays at 0.1; ``freeze_fusion_lr`` (default true)
asks for that by setting ``schedule = "constant"`` on the group (``ParamGroup.schedule``), which the optimizer
builder honours.

**Heads** (evaluation, no rotation): ``net1``, ``net2``, ``fusion`` (z_f; needs both nets), ``mean_logits``
(mean of z_1, z_2), ``ensemble`` (mean softmax of z_1, z_2); ``oracle_any_net``; derived ``net_avg`` (the
release's "accSummary" checkpoint criterion). ``deploy.pt`` holds net ``deploy_net`` (default 1) as the plain
registered backbone ``cfg.model.name``: for ``cmff_vgg16`` that is :class:`CMFFVGG16` (registered here: state
keys ``stem.*``, ``stages.{0..3}.*``, ``classifier.*``), for the ResNets the stock ``resnet32``/``resnet18``...
(keys ``conv1``, ``bn1``, ``layer*``, ``fc``), with the shared stem (and classifier) included.

**Decisions** where the release is ambiguous (the cross-attention's token layout and who queries, the
similarity loss, one stem pass per step, unused released modules not built, init, the ResNet variant,
input size, epoch count), each with the knob that changes it: ``docs/methods.md#cmff`` (CMFF.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import (
    average_accuracy,
    check_choice,
    check_distillation,
    check_int,
    ensemble_heads,
    scalar,
)
from okd.methods.cmff_net import CMFFNet
from okd.models.cmff_vgg import CMFFVGG16
from okd.nn.cross_attention import LAYOUTS, QUERY_FROM
from okd.nn.fusion import FusionModule
from okd.nn.losses import cross_entropy, kl_div_t, ramped_kl_weight
from okd.nn.rotation import joint_labels, rotate_batch, similarity_ce

__all__ = [
    "CMFF",
    "CMFFNet",
    "CMFFOutputs",
    "CMFFParams",
    "CMFFVGG16",
    "cmff_losses",
    "joint_labels",
    "rotate_batch",
    "similarity_ce",
]

# ------------------------------------------------------------------------------------------------- params


@dataclass
class CMFFParams:
    temperature: float = 3.0
    kl_weight: float = 1.0
    rampup_length: int = 80
    #: added to every KL target probability (the release's KLLoss: 1e-7)
    target_eps: float = 1e-7
    #: the rotation expansion and both auxiliary heads (false: neither, and no projections are built)
    self_supervision: bool = True
    rot_weight: float = 1.0
    sim_weight: float = 5.0
    sim_temperature: float = 1.0
    #: the stage whose fused knowledge feeds the auxiliary heads (0-based; every released script: 2)
    aux_stage: int = 2
    #: average-pool the fused knowledge to this size before flattening (null: flatten as released)
    aux_pool: int | None = None
    #: hidden widths of auxiliary head 1 (null: D/2, D/4 with D its input width: the VGG release's 1024, 512; the
    #: release's ResNet head has three, 2048, 1024, 512, which the ResNet configs set)
    rot_hidden: list[int] | None = None
    #: width of auxiliary head 2's projection (null: its input width D; VGG: 2048)
    proj_dim: int | None = None
    #: training resolution (sizes the auxiliary heads); null: 32, or 64 for the ImageNet ResNets (TinyImageNet)
    image_size: int | None = None
    #: one stem for both nets (the released VGG); false: one stem per net (the released ResNet)
    share_stem: bool = True
    #: net 2 uses net 1's classifier; null: as released (true for cmff_vgg16, false for the ResNets)
    shared_classifier: bool | None = None
    #: dropout of the VGG classifier and of auxiliary head 1 (released: 0)
    dropout: float = 0.0
    attn_heads: int = 4
    #: "chunks" (released: the d-vector is cut into attn_heads tokens) | "single" (one token per net)
    attn_layout: str = "chunks"
    #: "other" (released: net i's update queries come from the partner) | "own" (textbook cross-attention)
    attn_query_from: str = "other"
    attn_mlp_ratio: int = 2
    attn_dropout: float = 0.1
    #: std of the N(0, std) init of every Linear of the CMFF extras (released VGG: 0.01)
    linear_init_std: float = 0.01
    #: true stops the fusion losses at the fusion module (FFSD-style); CMFF: false
    detach_fusion_input: bool = False
    fusion_weight_decay: float = 1e-5
    #: keep the fusion module's lr constant (the release comments out its scheduler step)
    freeze_fusion_lr: bool = True
    #: which net deploy.pt holds (1 or 2)
    deploy_net: int = 1

    def validate(self) -> None:
        check_distillation(self.temperature, self.kl_weight, self.rampup_length, self.target_eps)
        for key in ("rot_weight", "sim_weight", "fusion_weight_decay", "linear_init_std"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.sim_temperature <= 0:
            raise ConfigError(f"method.sim_temperature must be positive, got {self.sim_temperature}")
        check_int("aux_stage", self.aux_stage, 0)
        check_int("attn_heads", self.attn_heads, 1)
        check_int("attn_mlp_ratio", self.attn_mlp_ratio, 1)
        for key in ("aux_pool", "proj_dim", "image_size"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), 1)
        if self.rot_hidden is not None and any(w < 1 for w in self.rot_hidden):
            raise ConfigError(f"method.rot_hidden widths must be >= 1, got {self.rot_hidden}")
        check_choice("attn_layout", self.attn_layout, LAYOUTS)
        check_choice("attn_query_from", self.attn_query_from, QUERY_FROM)
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"method.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.deploy_net not in (1, 2):
            raise ConfigError(f"method.deploy_net must be 1 or 2, got {self.deploy_net}")


# ------------------------------------------------------------------------------------ the training forward


@dataclass
class CMFFOutputs:
    logits: list[Tensor]  # z_1, z_2 (main path: the unrotated images)
    features: list[Tensor]  # f_1, f_2 (classifier inputs)
    fused: Tensor  # z_f
    rot_logits: Tensor | None = None  # g_1 on all 4B images
    proj: Tensor | None = None  # u on all 4B images


# ---------------------------------------------------------------------------------------------- the loss


def cmff_losses(
    out: CMFFOutputs, labels: Tensor, hp: CMFFParams, epoch: int, w: float | None = None
) -> dict[str, Tensor]:
    """The named terms of L (weights applied); ``out.rot_logits``/``out.proj`` None: no self-supervised terms.
    ``w``: the KL weight of ``epoch`` when the caller computed it (:meth:`CMFF.epoch_scalars`)."""
    z1, z2 = out.logits
    zf = out.fused
    if w is None:
        w = ramped_kl_weight(hp, epoch)["kl_weight"]
    T, eps = hp.temperature, hp.target_eps

    def kl(student: Tensor, target: Tensor) -> Tensor:
        return w * kl_div_t(student, target, T, detach_target=True, target_eps=eps)

    losses = {
        "net1/ce": cross_entropy(z1, labels),
        "net2/ce": cross_entropy(z2, labels),
        "fusion/ce": cross_entropy(zf, labels),
        "net1/kl_net2": kl(z1, z2),
        "net2/kl_net1": kl(z2, z1),
        "net1/kl_fusion": kl(z1, zf),
        "net2/kl_fusion": kl(z2, zf),
        "fusion/kl_net1": kl(zf, z1),
        "fusion/kl_net2": kl(zf, z2),
    }
    if out.rot_logits is not None:
        losses["net1/rot_ce"] = hp.rot_weight * cross_entropy(out.rot_logits, joint_labels(labels))
    if out.proj is not None:
        losses["net2/sim_ce"] = hp.sim_weight * similarity_ce(out.proj, hp.sim_temperature)
    losses["stat/kl_weight"] = scalar(w, z1)
    return losses


# --------------------------------------------------------------------------------------------- the method


@register_method(
    "cmff",
    description="CMFF: two nets (shared stem) with rotation self-supervision, cross-stage knowledge and a "
    "cross-attention fusion classifier teach each other",
    paper="Self-Supervised Learning and Cross-Modal Feature Fusion for Online Knowledge Distillation "
    "(CMFF README (Coralmss/CMFF); docs/methods.md#cmff)",
)
class CMFF(Method):
    Params = CMFFParams
    mixed_cohort = (
        "its two networks exchange feature maps stage by stage (cross-model fusion), which ties them to one "
        "backbone's stages"
    )

    @classmethod
    def cohort_size(cls, params: CMFFParams) -> int:
        """Two networks of one backbone."""
        return 2

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: CMFFParams = ctx.params
        self.net = CMFFNet(ctx.model, ctx.num_classes, hp)
        self.fusion = FusionModule(self.net.feature_dim, ctx.num_classes, 2)
        self.deploy_head = f"net{hp.deploy_net}"

    def param_groups(self) -> list[ParamGroup]:
        fusion = sgd_group("fusion", self.fusion.parameters(), self.ctx.optim, weight_decay=self.hp.fusion_weight_decay)
        if self.hp.freeze_fusion_lr:
            fusion.schedule = "constant"  # honoured by a builder that knows ParamGroup.schedule
        return [sgd_group("net", self.net.parameters(), self.ctx.optim), fusion]

    def fuse(self, feats: list[Tensor]) -> Tensor:
        """z_f = FusionModule(concat(cross_attention(f_1, f_2)) as 2C x 1 x 1 maps)."""
        a1, a2 = self.net.cross_attention(feats[0], feats[1])
        u = torch.cat([a1, a2], dim=1)[:, :, None, None]
        return self.fusion(u.detach() if self.hp.detach_fusion_input else u)[0]

    def forward_cmff(self, images: Tensor, labels_expanded: bool) -> CMFFOutputs:
        """Training forward: with self-supervision, ``images`` are already the 4B rotated batch."""
        net = self.net
        finals, fused = net.forward_nets(images, aux=labels_expanded)
        if labels_expanded:
            finals = [f[0::4] for f in finals]
        logits, feats = net.heads(finals)
        out = CMFFOutputs(logits, feats, self.fuse(feats))
        if labels_expanded:
            out.rot_logits = net.rot_head(net._aux_input(fused[0]))
            out.proj = net.proj_head(net._aux_input(fused[1]))
        return out

    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return ramped_kl_weight(self.hp, epoch)

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        s = self.scalars_at(epoch, scalars)
        ssl = self.hp.self_supervision
        out = self.forward_cmff(rotate_batch(images) if ssl else images, labels_expanded=ssl)
        return cmff_losses(out, labels, self.hp, epoch, w=s["kl_weight"])

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        finals, _ = self.net.forward_nets(images, aux=False)
        logits, feats = self.net.heads(finals)
        heads = {"net1": logits[0], "net2": logits[1], "fusion": self.fuse(feats)}
        heads.update(ensemble_heads(logits))
        return heads

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_net": ["net1", "net2"]}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``net_avg``: the mean accuracy of the two nets (the release's "accSummary" checkpoint criterion)."""
        return average_accuracy(metrics, ["net1", "net2"], "net_avg")

    def deployable(self) -> nn.Module:
        """Net ``deploy_net`` as the plain backbone ``cfg.model.name`` (stem and shared classifier included)."""
        return self.net.single_net(self.hp.deploy_net - 1)
