"""FFSD: Feature Fusion and Self-Distillation (Li et al., arXiv 2103.14473; official code SJLeo/FFSD).

``docs/methods.md#ffsd``, as the official CIFAR trainer computes it. The cohort: M common students S_0..S_{M-1}, a
leader L (same backbone) with a TransFusion decoder on its deepest tap, a fusion module F over the detached
deepest student maps, and SD modules G_1..G_{M-1} (none for student 0) and G_L.

Loss dict (every term of FFSD.3, weights applied, so the sum is the total; e = epoch + 1, λ(e) the 5-epoch
warm-up of λ_div, λ_fusion and λ_sd):

- ``student{i}/ce``       CE(z_i, y)
- ``student{i}/kl``       (1/(M-1)) Σ_{j≠i} KL_T(z_j.detach() -> z_i)                  (T² inside KL_T)
- ``student{i}/div``      i ≥ 1: λ_div(e) · D(att(T_i^K), att(T_{i-1}^K).detach())      (FFSD.4)
- ``student{i}/sd_div``   i ≥ 1: λ_div(e) · Σ_j NL2(att(T_i^j), att(G_i(Ψ(T_{i-1}^K.detach()))^j).detach())
- ``fusion/ce``           CE(z_F, y)
- ``fusion/kl``           KL_T(z_ens.detach() -> z_F), z_ens the mean of the students' logits
- ``leader/ce``           CE(z_L, y)
- ``leader/kl``           KL_T(z_F.detach() -> z_L)
- ``leader/fused_att``    λ_fus(e) · NL2(att(A_L^K), att(Φ).detach())
- ``leader/decoder``      λ_fus(e) · NL2(att(d_L), att(U))                                 (U is detached)
- ``leader/sd``           λ_fus(e) · Σ_j NL2(att(A_L^j), att(G_L(Φ.detach())^j).detach())
- ``sd{i}/feature``, ``sd{i}/attention``   i ≥ 1: λ_sd(e) · Σ_j NL2(G_i(T_i^K.detach())^j, T_i^j.detach()),
  and the same between their attention maps (G_i in train mode)
- ``sdL/feature``, ``sdL/attention``       the same for G_L on the leader's own taps
- ``stat/warmup``         the warm-up factor λ(e)/λ (logged, not summed)

SD modules produce targets in eval mode under ``no_grad`` (BN running statistics, no graph) and are trained in
train mode afterwards, so their running statistics update once per step, after the targets are made, as in
the official order. Every cross-network quantity is detached, so one backward of the summed dict gives each
component exactly the gradient of its own loss (the official per-component backward passes; tested).

Ablations (``Params``): ``self_distillation`` both|students|leader|none drops ``student{i}/sd_div`` + the G_i
(students off) and/or ``leader/sd`` + G_L (leader off); ``diversity`` attention|l2|none replaces or drops
``student{i}/div`` (the SD-propagated term follows ``self_distillation`` alone); ``feature_fusion: false``
removes F and the decoder: drops ``fusion/*``, ``leader/fused_att``, ``leader/decoder`` and ``leader/sd``
(G_L has no input without Φ, so it needs ``self_distillation`` students|none), and ``leader/kl`` then
distils from the students' mean logits z_ens instead of z_F.

Evaluation heads: ``leader`` (deployed), ``student{i}``, ``fusion``, ``students_mean_logits``, ``ensemble`` (mean
of softmax), plus the oracle ``oracle_any_student_correct``, which is what the official code logs as
"Ensemble" (FFSD.7); its "Average" is the mean of the ``student{i}`` accuracies. Epochs: the configs train 299
epochs like the official ``range(1, 300)`` loop; ``train.epochs=300`` is the paper's count.
Not reproduced: the official trainer's one train-mode forward of student 0 on random noise at construction
(it only nudges that student's BN running statistics once).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, adam_group, register_method, sgd_group
from okd.methods.branch_base import scalar
from okd.models import create_model
from okd.models.taps import check_halving_taps, require_taps
from okd.nn.diversity import diversity_feature_target, diversity_loss, l2_diversity_loss
from okd.nn.fusion import FusionModule, TransFusionDecoder
from okd.nn.losses import (
    attention_map,
    cross_entropy,
    ffsd_warmup,
    kl_div_t,
    logit_mean,
    normalized_l2,
    softmax_ensemble,
)
from okd.nn.self_distillation import SelfDistillationModule, sd_channels_for

SELF_DISTILLATION_CHOICES = ("both", "students", "leader", "none")
DIVERSITY_CHOICES = ("attention", "l2", "none")
L2_TAPS_CHOICES = ("auto", "all", "last")
SD_NEEDS = (
    "its self-distillation modules map the deepest tap back to every shallower one by stride-2 transposed "
    "convolutions (method.self_distillation)"
)


@dataclass
class FFSDParams:
    """FFSD's knobs; defaults are the official CIFAR values (``docs/methods.md#ffsd``, FFSD.6)."""

    num_students: int = 2  # M common students (the leader is extra)
    temperature: float = 2.0
    lambda_diversity: float = 1e-5  # weights student{i}/div and student{i}/sd_div
    lambda_fusion: float = 10.0  # weights leader/fused_att, leader/decoder and leader/sd
    lambda_sd: float = 1000.0  # weights only the SD modules' own training
    warmup_epochs: int = 5  # λ(e) = λ·exp(-5(1 - e/5)^2) for the 1-based epoch e <= 5
    fusion_weight_decay: float = 1e-5
    sd_lr: float = 1e-3  # Adam
    sd_weight_decay: float = 1e-4  # Adam, coupled L2
    #: where the SD-propagated terms apply: both | students | leader | none ("FFSD w/o SD")
    self_distillation: str = "both"
    #: false: no fusion module nor decoder (drops fusion/*, leader/fused_att, leader/decoder, leader/sd);
    #: the leader's KL then learns from the students' mean logits
    feature_fusion: bool = True
    #: attention (official D) | l2 (paper's "L2": -Σ NL2 of attention maps vs the previous student) | none
    diversity: str = "attention"
    #: taps of the l2 diversity: all | last | auto (last when the students' SD terms are on, i.e. the paper's
    #: "L2 with SD"; all otherwise, the paper's "L2")
    l2_diversity_taps: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a bad value, naming the key."""
        if isinstance(self.num_students, bool) or int(self.num_students) != self.num_students:
            raise ConfigError(f"method.num_students must be an integer >= 2, got {self.num_students!r}")
        if self.num_students < 2:
            raise ConfigError(f"method.num_students must be >= 2, got {self.num_students}")
        if not self.temperature > 0:
            raise ConfigError(f"method.temperature must be positive, got {self.temperature}")
        nonneg = ("lambda_diversity", "lambda_fusion", "lambda_sd", "fusion_weight_decay", "sd_weight_decay")
        for key in nonneg:
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not self.sd_lr > 0:
            raise ConfigError(f"method.sd_lr must be positive, got {self.sd_lr}")
        for key, choices in (
            ("self_distillation", SELF_DISTILLATION_CHOICES),
            ("diversity", DIVERSITY_CHOICES),
            ("l2_diversity_taps", L2_TAPS_CHOICES),
        ):
            if getattr(self, key) not in choices:
                raise ConfigError(
                    f"method.{key}={getattr(self, key)!r} is not valid; choose one of: {', '.join(choices)}"
                )
        if not self.feature_fusion and self.self_distillation in ("both", "leader"):
            raise ConfigError(
                "method.feature_fusion=false removes the fused map, the input of the leader's SD module; "
                "set method.self_distillation to 'students' or 'none'"
            )

    @property
    def sd_on_students(self) -> bool:
        return self.self_distillation in ("both", "students")

    @property
    def sd_on_leader(self) -> bool:
        return self.self_distillation in ("both", "leader")


def mutual_learning_kl(logits: list[Tensor], i: int, temperature: float) -> Tensor:
    """(1/(M-1)) Σ_{j≠i} KL_T(z_j.detach() -> z_i), T² included (the DML part of L_i)."""
    peers = [kl_div_t(logits[i], z, temperature, detach_target=True) for j, z in enumerate(logits) if j != i]
    return torch.stack(peers).sum() / (len(logits) - 1)


def attention_transfer_sum(sources: list[Tensor], targets: list[Tensor]) -> Tensor:
    """Σ_j NL2(att(sources_j), att(targets_j)). Detaching the targets is the caller's job."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} source maps but {len(targets)} targets")
    pairs = zip(sources, targets, strict=True)
    return torch.stack([normalized_l2(attention_map(s), attention_map(t)) for s, t in pairs]).sum()


def sd_training_terms(outputs: list[Tensor], taps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The SD module's own loss terms, unweighted: Σ_j NL2(G^j, T^j.detach()) (raw features) and
    Σ_j NL2(att(G^j), att(T^j).detach())."""
    pairs = list(zip(outputs, taps, strict=True))
    feature = torch.stack([normalized_l2(o, t.detach()) for o, t in pairs]).sum()
    attention = torch.stack([normalized_l2(attention_map(o), attention_map(t.detach())) for o, t in pairs])
    return feature, attention.sum()


@register_method(
    "ffsd",
    description="FFSD: M common students with a diversity chain, a leader learning from a fusion module, "
    "self-distillation modules (the leader is deployed)",
    paper="Li et al., Distilling a Powerful Student Model via Online Knowledge Distillation, "
    "arXiv 2103.14473 (code: SJLeo/FFSD)",
)
class FFSD(Method):
    """FFSD's cohort (``docs/methods.md#ffsd``). ``deployable()`` is the leader backbone without its decoder."""

    Params = FFSDParams
    deploy_head = "leader"
    mixed_cohort = (
        "its fusion module concatenates the students' feature maps channel by channel (maps of equal shapes), "
        "and its leader is one more copy of the students' network"
    )
    cohort_key = "num_students"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: FFSDParams = self.hp
        hp.validate()
        m, k = hp.num_students, ctx.num_classes
        # construction order as the official trainer: students, SD modules, fusion, leader (+ decoder)
        self.students = nn.ModuleList(create_model(ctx.model, k) for _ in range(m))
        sd_on = hp.sd_on_students or hp.sd_on_leader
        require_taps(self.students[0], "ffsd", min_taps=2 if sd_on else 1)
        if sd_on:
            check_halving_taps(self.students[0], "ffsd", SD_NEEDS)
        tap_channels = tuple(self.students[0].tap_channels)
        channels = tap_channels[-1]
        sd_channels = sd_channels_for(tap_channels) if sd_on else []
        self.sd_students = nn.ModuleList(
            SelfDistillationModule(sd_channels) for _ in range(1, m) if hp.sd_on_students
        )  # sd_students[i - 1] is G_i
        self.sd_leader = SelfDistillationModule(sd_channels) if hp.sd_on_leader else None
        self.fusion = FusionModule(channels, k, m) if hp.feature_fusion else None
        self.leader = create_model(ctx.model, k)
        self.leader_decoder = TransFusionDecoder(channels, m) if hp.feature_fusion else None

    # ----------------------------------------------------------------------------------------- optimizers
    def param_groups(self) -> list[ParamGroup]:
        hp, optim = self.hp, self.ctx.optim
        groups = [sgd_group(f"student{i}", s.parameters(), optim) for i, s in enumerate(self.students)]
        decoder = self.leader_decoder.parameters() if self.leader_decoder is not None else ()
        leader_params = itertools.chain(self.leader.parameters(), decoder)
        groups.append(sgd_group("leader", leader_params, optim))
        if self.fusion is not None:
            fusion_wd = hp.fusion_weight_decay
            groups.append(sgd_group("fusion", self.fusion.parameters(), optim, weight_decay=fusion_wd))
        adam = {"lr": hp.sd_lr, "weight_decay": hp.sd_weight_decay}
        for i, g in enumerate(self.sd_students, start=1):
            groups.append(adam_group(f"sd{i}", g.parameters(), **adam))
        if self.sd_leader is not None:
            groups.append(adam_group("sdL", self.sd_leader.parameters(), **adam))
        return groups

    # -------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _sd_targets(module: SelfDistillationModule, x: Tensor) -> list[Tensor]:
        """G(x) in eval mode without a graph: targets, aligned with taps 1..K-1."""
        was_training = module.training
        module.eval()
        with torch.no_grad():
            outs = module(x.detach())
        module.train(was_training)
        return outs

    @staticmethod
    def _sd_train_outputs(module: SelfDistillationModule, deepest: Tensor) -> list[Tensor]:
        """G(T^K.detach()) in train mode (updates its BN running statistics)."""
        was_training = module.training
        module.train()
        outs = module(deepest.detach())
        module.train(was_training)
        return outs

    def _l2_taps(self, num_taps: int) -> list[int]:
        mode = self.hp.l2_diversity_taps
        if mode == "auto":
            mode = "last" if self.hp.sd_on_students else "all"
        return list(range(num_taps)) if mode == "all" else [num_taps - 1]

    # ------------------------------------------------------------------------------------------- training
    def epoch_scalars(self, epoch: int) -> dict[str, float]:
        return {"warmup": ffsd_warmup(epoch + 1, self.hp.warmup_epochs)}

    def training_step(
        self, images: Tensor, labels: Tensor, epoch: int, scalars: dict[str, float] | None = None
    ) -> dict[str, Tensor]:
        hp = self.hp
        m, temp = hp.num_students, hp.temperature
        warm = self.scalars_at(epoch, scalars)["warmup"]
        lam_div, lam_fus, lam_sd = hp.lambda_diversity * warm, hp.lambda_fusion * warm, hp.lambda_sd * warm

        # forwards, in the official order: leader, students, fusion
        z_leader, leader_taps = self.leader.forward_taps(images)
        decoded = self.leader_decoder(leader_taps[-1]) if self.leader_decoder is not None else None
        logits, taps = [], []
        for student in self.students:
            z, t = student.forward_taps(images)
            logits.append(z)
            taps.append(t)
        fusion_in = torch.cat([t[-1].detach() for t in taps], dim=1)  # U
        z_fusion, fused = self.fusion(fusion_in) if self.fusion is not None else (None, None)
        z_ens = logit_mean(logits)

        losses: dict[str, Tensor] = {}
        # 1.4.1 common students
        for i in range(m):
            losses[f"student{i}/ce"] = cross_entropy(logits[i], labels)
            losses[f"student{i}/kl"] = mutual_learning_kl(logits, i, temp)
            if i == 0:
                continue
            cur, prev = taps[i], taps[i - 1]
            if hp.diversity == "attention":
                losses[f"student{i}/div"] = lam_div * diversity_loss(
                    attention_map(cur[-1]), attention_map(prev[-1]), detach_target=True
                )
            elif hp.diversity == "l2":
                sel = self._l2_taps(len(cur))
                losses[f"student{i}/div"] = lam_div * l2_diversity_loss(
                    [cur[j] for j in sel], [prev[j] for j in sel], detach_target=True
                )
            if hp.sd_on_students:
                psi = diversity_feature_target(prev[-1].detach())
                targets = self._sd_targets(self.sd_students[i - 1], psi)
                losses[f"student{i}/sd_div"] = lam_div * attention_transfer_sum(cur[:-1], targets)

        # 1.4.2 fusion module
        if z_fusion is not None:
            losses["fusion/ce"] = cross_entropy(z_fusion, labels)
            losses["fusion/kl"] = kl_div_t(z_fusion, z_ens, temp, detach_target=True)

        # 1.4.4 leader
        losses["leader/ce"] = cross_entropy(z_leader, labels)
        leader_target = z_fusion if z_fusion is not None else z_ens
        losses["leader/kl"] = kl_div_t(z_leader, leader_target, temp, detach_target=True)
        if fused is not None:
            fused_d = fused.detach()
            losses["leader/fused_att"] = lam_fus * normalized_l2(attention_map(leader_taps[-1]), attention_map(fused_d))
            # att(U) is the channel mean over all M·C channels: the mean of the students' attention maps
            att_u = attention_map(fusion_in)
            losses["leader/decoder"] = lam_fus * normalized_l2(attention_map(decoded), att_u)
            if self.sd_leader is not None:
                targets = self._sd_targets(self.sd_leader, fused_d)
                losses["leader/sd"] = lam_fus * attention_transfer_sum(leader_taps[:-1], targets)

        # 1.4.5 SD modules' own training (after every target above was made)
        for i, module in enumerate(self.sd_students, start=1):
            outs = self._sd_train_outputs(module, taps[i][-1])
            feat, att = sd_training_terms(outs, taps[i][:-1])
            losses[f"sd{i}/feature"] = lam_sd * feat
            losses[f"sd{i}/attention"] = lam_sd * att
        if self.sd_leader is not None:
            outs = self._sd_train_outputs(self.sd_leader, leader_taps[-1])
            feat, att = sd_training_terms(outs, leader_taps[:-1])
            losses["sdL/feature"] = lam_sd * feat
            losses["sdL/attention"] = lam_sd * att

        losses["stat/warmup"] = scalar(warm, z_leader)
        return losses

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Heads: ``leader``, ``student{i}``, ``fusion`` (F on the students' deepest maps),
        ``students_mean_logits`` and ``ensemble`` (log of the mean of the students' softmax)."""
        out = {"leader": self.leader(images)}
        logits, deepest = [], []
        for i, student in enumerate(self.students):
            z, t = student.forward_taps(images)
            out[f"student{i}"] = z
            logits.append(z)
            deepest.append(t[-1])
        if self.fusion is not None:
            out["fusion"] = self.fusion(torch.cat(deepest, dim=1))[0]
        out["students_mean_logits"] = logit_mean(logits)
        out["ensemble"] = softmax_ensemble(logits)
        return out

    def oracle_groups(self) -> dict[str, list[str]]:
        """The official code's "Ensemble" metric: a sample counts if *any* student is right (an oracle)."""
        return {"oracle_any_student_correct": [f"student{i}" for i in range(self.hp.num_students)]}

    def deployable(self) -> nn.Module:
        """The leader backbone alone: a plain ``create_model(model, K)`` state dict. Of the method's
        ``leader*`` keys, ``leader_decoder.*`` (the TransFusion head, used only in training) is dropped."""
        return self.leader
