"""OKDPH: Online Knowledge Distillation via Parameter Hybridization (Zhang et al., CVPR 2023); docs/methods.md#okdph.

N students of one architecture (identically initialised unless ``diff_init``) and a hybrid-weight model H, one
more copy with no optimizer. At the start of every step H's whole ``state_dict`` (parameters and BatchNorm
buffers, ``num_batches_tracked`` included) becomes the mean of the students' (``hwm_mix``), without gradient.
Every network, H included, runs in train mode on its own view; with z_bar the detached mean of the N + 1 logits:

    L_i = omega CE(z_i, y) + (1 - omega) CE(z_H, y) + beta T^2 KL_T(z_bar -> z_i),    T = 4

As released (``hwm_grad="none"``) H's weights are copies, so the CE(z_H) term reaches no student: it is logged
(``stat/hwm_ce``), and H's forward runs without autograd. The paper's reading (``hwm_grad="through_mix"``) runs H
with the mix of the students' live parameters, so (1 - omega) CE(z_H), added once, gives student i
(1 - omega) r_i dCE/dtheta_H. Fusion pulls each student to H, theta_i <- gamma theta_H + (1 - gamma) theta_i over
the whole ``state_dict`` (momentum untouched): ``interval="<gap>_epoch"`` after the epoch's evaluation when
epoch % gap == 0 (0-based), with the H of the epoch's last step; ``"<gap>_batch"`` after a step whose 0-based
index in the epoch is a multiple of gap, with that step's H; ``""`` never.

A standalone method, not an add-on over DML/KDCL cohorts: H's logits enter the students' target, so the base loss
changes, and the release has it on this one base (KDCL-naive with omega-weighted CE) only (``docs/methods.md``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from okd.data.views import check_view_names
from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import average_accuracy, check_choice, scalar
from okd.methods.pcl import as_views
from okd.models import create_model
from okd.nn.hybrid import check_same_layout, fuse_into, mix_into, mixed_parameters
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean


@dataclass
class OKDPHParams:
    #: N, the students (H is one more copy)
    num_students: int = 2
    #: weight of each student's own CE (the rest, 1 - omega, weighs CE(z_H))
    omega: float = 0.8
    #: weight of the KL to the mean of the N + 1 logits
    beta: float = 0.8
    #: fusion rate: theta_i <- gamma theta_H + (1 - gamma) theta_i (1: copy H; 0: no fusion)
    gamma: float = 0.5
    temperature: float = 4.0
    #: when fusion runs: "<gap>_epoch", "<gap>_batch", or "" (never)
    interval: str = "1_epoch"
    #: mean (the release) | dirichlet (weights r ~ Dir(1, ..., 1) per step: the paper's "sampled convex
    #: combinations", not exercised by the released code, whose Dirichlet path crashes)
    hwm_mix: str = "mean"
    #: none (the release: the HWM loss reaches no student) | through_mix (the paper: H is a function of the students)
    hwm_grad: str = "none"
    #: mix and fuse the BatchNorm buffers too (the release); false: H keeps its own running statistics, moved by
    #: its own train-mode forwards, and fusion moves parameters only
    mix_buffers: bool = True
    #: epoch-level fusion with H rebuilt from the students at fusion time (the release uses the H of the epoch's
    #: last step, built before that step's update)
    fresh_hwm_for_fusion: bool = False
    #: independently initialised students (the release starts all N + 1 networks from student 0's weights)
    diff_init: bool = False
    #: each network's view, students first and H last (N + 1 names from okd.data.views: hflip, hflip+rot, cutout,
    #: base); empty: every view gets the run's standard crop and flip
    views: list[str] = field(default_factory=list)
    #: the student deploy.pt holds
    deploy_student: int = 0

    def validate(self) -> None:
        if self.num_students < 2:
            raise ConfigError(f"method.num_students must be >= 2, got {self.num_students}")
        for key in ("omega", "gamma"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"method.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.beta < 0:
            raise ConfigError(f"method.beta must be >= 0, got {self.beta}")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature must be positive, got {self.temperature}")
        fusion_schedule(self.interval)
        check_choice("hwm_mix", self.hwm_mix, ("mean", "dirichlet"))
        check_choice("hwm_grad", self.hwm_grad, ("none", "through_mix"))
        if self.views:
            check_view_names(self.views, "method.views")
            if len(self.views) != self.num_students + 1:
                raise ConfigError(
                    f"method.views names {len(self.views)} views, but OKDPH needs num_students + 1 = "
                    f"{self.num_students + 1} (one per student, then the HWM's)"
                )
        if not 0 <= self.deploy_student < self.num_students:
            raise ConfigError(
                f"method.deploy_student must be in [0, {self.num_students - 1}], got {self.deploy_student}"
            )


def fusion_schedule(interval: str) -> tuple[int, str]:
    """``(gap, level)`` of ``method.interval``: level "epoch", "batch" or "" (no fusion, gap 0)."""
    if interval == "":
        return 0, ""
    gap, _, level = interval.partition("_")
    if not gap.isdigit() or int(gap) < 1 or level not in ("epoch", "batch"):
        raise ConfigError(
            f'method.interval must be "<gap>_epoch", "<gap>_batch" (gap >= 1) or "" (no fusion), got {interval!r}'
        )
    return int(gap), level


def okdph_losses(
    logits: list[Tensor], hwm_logits: Tensor, labels: Tensor, hp: OKDPHParams, hwm_ce: Tensor | None = None
) -> dict[str, Tensor]:
    """Each student's omega CE(z_i, y) and beta T^2 KL_T(z_bar -> z_i), z_bar the detached mean of the students'
    and H's logits; CE(z_H, y) logged as ``stat/hwm_ce``, or ``hwm/ce`` = (1 - omega) CE(z_H, y) when given
    (``hwm_ce``: the through-mix reading, added once)."""
    target = logit_mean([*logits, hwm_logits]).detach()
    losses = {}
    for i, z in enumerate(logits):
        losses[f"student{i}/ce"] = hp.omega * cross_entropy(z, labels)
        losses[f"student{i}/kl"] = hp.beta * kl_div_t(z, target, hp.temperature, detach_target=True)
    if hwm_ce is None:
        losses["stat/hwm_ce"] = cross_entropy(hwm_logits.detach(), labels)
    else:
        losses["hwm/ce"] = (1.0 - hp.omega) * hwm_ce
        losses["stat/hwm_ce"] = hwm_ce.detach()
    return losses


@register_method(
    "okdph",
    description="OKDPH: students + a hybrid-weight model (their weight mean) in a KDCL-naive target, and fusion",
    paper="Zhang et al. Online Knowledge Distillation via Parameter Hybridization. CVPR 2023",
)
class OKDPH(Method):
    Params = OKDPHParams
    cohort_key = "num_students"
    mixed_cohort = "its hybrid-weight model is the key-by-key mean of the students' weights, so all must be one network"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: OKDPHParams = self.hp
        self.deploy_head = f"student{hp.deploy_student}"
        self.students = nn.ModuleList(create_model(m, ctx.num_classes) for m in ctx.cohort(hp.num_students))
        check_same_layout(list(self.students))
        if not hp.diff_init:
            for s in self.students[1:]:
                s.load_state_dict(self.students[0].state_dict())
        self.hwm = copy.deepcopy(self.students[0])
        self.hwm.requires_grad_(False)  # no optimizer: its weights are overwritten every step
        self.gap, self.level = fusion_schedule(hp.interval)
        #: the 0-based index of the next step in the epoch (0 at every epoch boundary, where checkpoints are taken)
        self.step_in_epoch = 0

    # ------------------------------------------------------------------ contract
    @classmethod
    def views_for(cls, params: OKDPHParams) -> int:
        return params.num_students + 1

    @classmethod
    def view_augmentations(cls, params: OKDPHParams) -> list[str] | None:
        return list(params.views) or None

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group(f"student{i}", s.parameters(), self.ctx.optim) for i, s in enumerate(self.students)]

    def mix_weights(self) -> list[float]:
        """r: 1/N each, or one Dirichlet(1, ..., 1) draw (torch's global generator, on the CPU; under DDP rank 0's
        draw, broadcast to every process)."""
        n = len(self.students)
        if self.hp.hwm_mix == "mean":
            return [1.0 / n] * n
        r = torch.distributions.Dirichlet(torch.ones(n, dtype=torch.float64)).sample()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process draws from its own stream: all take rank 0's r (the one a single-process run with
            # that stream draws), or their H, its loss and every fusion would differ and the ranks drift apart
            r = r.to(next(self.students[0].parameters()).device)  # NCCL broadcasts device tensors only
            torch.distributed.broadcast(r, src=0)
        return r.tolist()

    def build_hwm(self, weights: list[float]) -> None:
        """theta_H <- sum_i r_i theta_i over the whole state_dict (parameters only without ``mix_buffers``)."""
        mix_into(self.hwm, list(self.students), weights, buffers=self.hp.mix_buffers)

    def training_step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int) -> dict[str, Tensor]:
        n = len(self.students)
        views = as_views(images, n + 1, "OKDPH")
        r = self.mix_weights()
        self.build_hwm(r)
        logits = [s(v) for s, v in zip(self.students, views[:n], strict=True)]
        if self.hp.hwm_grad == "through_mix":
            z_h = functional_call(self.hwm, mixed_parameters(list(self.students), r), (views[n],), strict=False)
            losses = okdph_losses(logits, z_h, labels, self.hp, hwm_ce=cross_entropy(z_h, labels))
        else:
            with torch.no_grad():
                z_h = self.hwm(views[n])
            losses = okdph_losses(logits, z_h, labels, self.hp)
        losses["stat/hwm_weighted_ce"] = (1.0 - self.hp.omega) * losses["stat/hwm_ce"]
        losses["stat/mix_weight0"] = scalar(r[0], z_h)
        return losses

    def after_optimizer_step(self) -> None:
        """Batch-level fusion of every student with this step's H, when due; counts the step."""
        if self.level == "batch" and self.step_in_epoch % self.gap == 0:
            self.fuse()
        self.step_in_epoch += 1

    def after_evaluation(self, epoch: int) -> None:
        """Epoch-level fusion when due (after the evaluation, as the release runs it); a new epoch's steps count
        from 0."""
        self.step_in_epoch = 0
        if self.level == "epoch" and epoch % self.gap == 0:
            if self.hp.fresh_hwm_for_fusion:
                self.build_hwm([1.0 / len(self.students)] * len(self.students))
            self.fuse()

    def fuse(self) -> None:
        for s in self.students:
            fuse_into(s, self.hwm, self.hp.gamma, buffers=self.hp.mix_buffers)

    # ------------------------------------------------------------------ evaluation
    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        heads = {f"student{i}": s(images) for i, s in enumerate(self.students)}
        heads["hwm"] = self.hwm(images)
        return heads

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """``student_avg`` and ``student_max`` over the students, and ``any_max``: the max over the students and H
        (the release's per-epoch figure; its max over epochs is the paper's metric)."""
        students = [f"student{i}" for i in range(len(self.students))]
        out = average_accuracy(metrics, students, "student_avg")
        for name, heads in (("student_max", students), ("any_max", [*students, "hwm"])):
            for k in ("top1", "top5"):
                values = [metrics[f"{h}/{k}"] for h in heads if f"{h}/{k}" in metrics]
                if len(values) == len(heads):
                    out[f"{name}/{k}"] = max(values)
        return out

    def deployable(self) -> nn.Module:
        return self.students[self.hp.deploy_student]
