"""KDCL: Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020), ``docs/methods.md#kdcl``.

m students, architectures may differ (``model.members``, student i being member i; ``method.models`` is the
older spelling of the same list; neither: m copies of ``model.name``). **Each student sees its own augmented
view** of the batch (``views`` = m). A soft target z_t is built from the students' logits by an
ensembling rule and every student learns from it, detached:

    L_i = (1 - alpha) CE(z_i, y) + alpha T^2 KL_T(z_t.detach() -> z_i),    alpha = 0.5, T = 4

(the shaoeric re-implementation's form and defaults; the paper's lambda and T are unverified). Rules
(the paper's four; their exact formulas are unverified, so each choice below is documented here):

- ``naive``: z_t = mean_i z_i (the paper's rule, and what the re-implementation's code computes at the
  commit okd follows). ``naive_target=sum`` sums the logits instead (a sharper target, m times the mean), as
  only an older revision of the re-implementation did; it does not reproduce that commit.
- ``linear``: z_t = sum_i w_i z_i with w on the probability simplex (w >= 0, sum w = 1) minimising
  CE(sum_i w_i z_i, y) on the batch (T = 1). The simplex keeps the problem bounded (unconstrained weights
  can drive the CE to 0 by scaling). Solver (:func:`fit_linear_weights`): the problem is convex; float64,
  ``linear_iters`` rounds of an active-set Newton method with the exact m x m Hessian (ridge-regularised):
  each round keeps the best of {stay; the Newton step on the current face of the simplex, scaled 1, 1/2, 1/4
  of the longest feasible step; the projected full Newton step; projected-gradient steps 1, 4, 16 / tr(H)},
  so the objective never increases; no host synchronisation (fixed work per batch).
- ``min_logit``: z_t,k = min_i (z_i,k - z_i,y): the per-class minimum of the logits shifted by the true-class
  logit.
- ``general``: z_t = sum_i w_i z_i with the generalisation-error weights of Perrone & Cooper's ensemble
  (recalled from the paper): w = C^-1 1 / (1^T C^-1 1), C_ij = E[(p_i - e_y) . (p_j - e_y)] over a held-out
  split of the training data (p = softmax at T = 1, students in eval mode, ``general_ridge`` x tr(C)/m added
  to the diagonal); weights may be negative. :meth:`KDCL.fit_on_holdout` estimates them into a buffer; the
  trainer calls it before every epoch on the ``data.holdout`` images withheld from training (required).

Optimisation: one SGD group per student (the configs set the re-implementation's lr 0.05, momentum 0.9,
wd 5e-4, no Nesterov, batch 64, 240 epochs, x0.1 at 150/180/210). The re-implementation steps the networks
one after another from one forward; with detached targets one backward of the summed loss is the same. It
zeroes the gradients every step, as the trainer does.
Heads: ``student<i>``, ``mean_logits`` and ``ensemble`` (the naive teacher; the other rules need labels or a
held-out fit). ``deploy.pt`` holds student ``deploy_student`` and describes that student's network. Its default:
student 0 with ``model.members``; with ``method.models`` (or copies), as before members existed, the first
student whose architecture is ``model.name``, and an explicit ``deploy_student`` must be one of that architecture.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import check_choice, ensemble_heads
from okd.methods.pcl import as_views
from okd.models import create_model
from okd.models.members import entry_spec, head_labels, member_entries
from okd.models.spec import spec_ref
from okd.nn.losses import cross_entropy, kl_div_t, logit_mean

RULES = ("naive", "linear", "min_logit", "general")


@dataclass
class KDCLParams:
    #: the students' networks, the older spelling of model.members (same entry forms; give one of the two);
    #: empty: model.members, else ``num_students`` copies of model.name
    models: list[Any] = field(default_factory=list)
    #: null: len(models) (or len(model.members)), or 2 when neither is given
    num_students: int | None = None
    #: naive | linear | min_logit | general
    ensemble: str = "naive"
    #: the naive teacher: mean of the logits (the paper and the re-implementation) | sum (an older revision of it)
    naive_target: str = "mean"
    temperature: float = 4.0
    #: L_i = (1 - alpha) CE + alpha T^2 KL
    alpha: float = 0.5
    scale_t2: bool = True
    #: solver rounds of the linear rule
    linear_iters: int = 20
    #: ridge of the general rule's error covariance, relative to tr(C)/m
    general_ridge: float = 1e-6
    #: null: student 0 with model.members; with method.models, the first student whose architecture is model.name
    deploy_student: int | None = None

    def student_count(self) -> int:
        if self.num_students is not None:
            return self.num_students
        return len(self.models) if self.models else 2

    def validate(self) -> None:
        m = self.student_count()
        if m < 2:
            raise ConfigError(f"method.num_students must be >= 2, got {m}")
        if self.models and len(self.models) != m:
            raise ConfigError(
                f"method.models lists {len(self.models)} students but method.num_students={self.num_students}; "
                "leave num_students null to use len(models)"
            )
        if self.models:
            member_entries(list(self.models), "method.models")
        check_choice("ensemble", self.ensemble, RULES)
        check_choice("naive_target", self.naive_target, ("mean", "sum"))
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method.alpha must be in [0, 1], got {self.alpha}")
        if self.linear_iters < 1:
            raise ConfigError(f"method.linear_iters must be >= 1, got {self.linear_iters}")
        if self.general_ridge < 0:
            raise ConfigError(f"method.general_ridge must be >= 0, got {self.general_ridge}")
        if self.deploy_student is not None and not 0 <= self.deploy_student < m:
            raise ConfigError(f"method.deploy_student={self.deploy_student} is not a student; choose 0..{m - 1}")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` (... x m) onto the probability simplex (sort-based)."""
    m = v.shape[-1]
    u = v.sort(dim=-1, descending=True).values
    css = u @ torch.ones(m, m, dtype=v.dtype, device=v.device).triu() - 1.0  # cumsum (deterministic on CUDA)
    ind = torch.arange(1, m + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / ind > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def combined_ce(weights: Tensor, z: Tensor, labels: Tensor) -> Tensor:
    """CE(sum_i w_i z_i, y) for each row of ``weights`` (c x m); ``z``: m x B x K. Returns c values."""
    mix = torch.einsum("cm,mbk->cbk", weights, z)
    true = mix.gather(2, labels.view(1, -1, 1).expand(mix.shape[0], -1, 1)).squeeze(2)
    return (mix.logsumexp(dim=2) - true).mean(dim=1)


def _face_newton(w: Tensor, g: Tensor, hess: Tensor, ridge: Tensor) -> Tensor:
    """The Newton direction on the simplex face of ``w``: zero on the active set {w_i = 0, g_i >= lambda}
    (lambda = mean gradient over the support) and summing to zero on the rest (an equality-constrained KKT solve)."""
    m = w.shape[0]
    support = w > 0
    lam = (g * support).sum() / support.sum().clamp_min(1)
    free = support | (g < lam)
    both = free.view(-1, 1) & free.view(1, -1)
    eye = torch.eye(m, dtype=w.dtype, device=w.device)
    kkt = torch.zeros(m + 1, m + 1, dtype=w.dtype, device=w.device)
    kkt[:m, :m] = torch.where(both, hess + ridge * eye, eye)
    kkt[:m, m] = kkt[m, :m] = free.to(w.dtype)
    rhs = torch.cat([-(g * free), g.new_zeros(1)])
    return torch.linalg.solve_ex(kkt, rhs)[0][:m]


@torch.no_grad()
def fit_linear_weights(logits: list[Tensor], labels: Tensor, iters: int = 20, ridge: float = 1e-9) -> Tensor:
    """Simplex weights w minimising CE(sum_i w_i z_i, y) on the batch (float64; see the module docstring)."""
    z = torch.stack([t.detach() for t in logits]).double()
    m, b, k = z.shape
    onehot = F.one_hot(labels, k).to(z.dtype)
    w = torch.full((m,), 1.0 / m, dtype=z.dtype, device=z.device)
    powers = torch.arange(3, dtype=z.dtype, device=z.device).view(-1, 1)
    steps, gsteps = 0.5**powers, 4.0**powers  # [1, 1/2, 1/4] and [1, 4, 16], made on the device
    for _ in range(iters):
        p = torch.softmax(torch.einsum("m,mbk->bk", w, z), dim=1)
        g = torch.einsum("bk,mbk->m", p - onehot, z) / b
        pz = torch.einsum("bk,mbk->mb", p, z)
        hess = torch.einsum("mbk,nbk->mn", z * p, z) / b - pz @ pz.T / b
        trace = hess.diagonal().sum().clamp_min(1e-12)
        d = _face_newton(w, g, hess, ridge * trace + 1e-12)
        reach = torch.where(d < 0, w / (-d).clamp_min(1e-300), torch.full_like(w, float("inf"))).min().clamp(max=1.0)
        inside = w + (steps * reach) * d  # stays on the simplex
        projected = project_simplex(torch.cat([(w + d).unsqueeze(0), w - gsteps * g / trace]))
        cands = torch.cat([w.unsqueeze(0), inside.clamp_min(0.0), projected])
        fs = torch.nan_to_num(combined_ce(cands, z, labels), nan=float("inf"))
        w = cands[fs.argmin()]
    return w / w.sum()


def min_logit_target(logits: list[Tensor], labels: Tensor) -> Tensor:
    """z_t,k = min_i (z_i,k - z_i,y)."""
    z = torch.stack(logits)
    true = z.gather(2, labels.view(1, -1, 1).expand(z.shape[0], -1, 1))
    return (z - true).min(dim=0).values


def general_weights(cov: Tensor, ridge: float = 1e-6) -> Tensor:
    """w = C^-1 1 / (1^T C^-1 1) for the error covariance C (m x m), with ridge x tr(C)/m on the diagonal."""
    m = cov.shape[0]
    c = cov.double() + ridge * cov.double().diagonal().sum() / m * torch.eye(m, dtype=torch.float64, device=cov.device)
    x = torch.linalg.solve(c, torch.ones(m, dtype=torch.float64, device=cov.device))
    return x / x.sum()


def weighted_target(logits: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i z_i."""
    z = torch.stack(logits)
    return torch.einsum("m,mbk->bk", weights.to(z.dtype), z)


def kdcl_target(
    logits: list[Tensor], labels: Tensor, hp: KDCLParams, general: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The ensemble teacher of ``hp.ensemble`` from detached logits, and its weights for the weighted rules
    (``general``: the held-out weights)."""
    logits = [z.detach() for z in logits]
    if hp.ensemble == "naive":
        return (logit_mean(logits) if hp.naive_target == "mean" else torch.stack(logits).sum(dim=0)), None
    if hp.ensemble == "min_logit":
        return min_logit_target(logits, labels), None
    if hp.ensemble == "linear":
        weights = fit_linear_weights(logits, labels, hp.linear_iters)
    elif hp.ensemble == "general":
        if general is None:
            raise ValueError("the general rule needs the held-out weights")
        weights = general
    else:
        raise ValueError(f"unknown ensemble rule {hp.ensemble!r}")
    return weighted_target(logits, weights), weights


def kdcl_losses(logits: list[Tensor], target: Tensor, labels: Tensor, hp: KDCLParams) -> dict[str, Tensor]:
    """``student<i>/ce`` = (1 - alpha) CE and ``student<i>/kl`` = alpha T^2 KL_T(target -> z_i), target detached."""
    losses: dict[str, Tensor] = {}
    for i, z in enumerate(logits):
        losses[f"student{i}/ce"] = (1.0 - hp.alpha) * cross_entropy(z, labels)
        losses[f"student{i}/kl"] = hp.alpha * kl_div_t(
            z, target, hp.temperature, detach_target=True, scale_t2=hp.scale_t2
        )
    losses["stat/teacher_ce"] = cross_entropy(target.detach(), labels)
    return losses


@register_method(
    "kdcl",
    description="KDCL: students (any architectures) on their own views learn from an ensemble of their logits",
    paper="Guo et al. Online Knowledge Distillation via Collaborative Learning. CVPR 2020",
)
class KDCL(Method):
    Params = KDCLParams
    views = 2
    mixed_cohort = None  # any networks: only their logits meet
    cohort_key = "num_students"
    members_key = "models"

    @classmethod
    def views_for(cls, params: KDCLParams) -> int:
        """One view per student."""
        return params.student_count()

    @classmethod
    def cohort_size(cls, params: KDCLParams) -> int:
        return params.student_count()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        hp: KDCLParams = ctx.params
        m = hp.student_count()
        if ctx.members is not None:
            self.names = ctx.cohort(m)
            self.deploy_index = hp.deploy_student or 0
        else:
            size = ctx.input_size
            entries = member_entries(list(hp.models), "method.models") if hp.models else None
            self.names = [spec_ref(entry_spec(e, size)) for e in entries] if entries else [ctx.model] * m
            self.deploy_index = self._deploy_index(hp, ctx.model)
        self.students = nn.ModuleList(create_model(name, ctx.num_classes) for name in self.names)
        self.deploy_head = f"student{self.deploy_index}"
        self.register_buffer("general_weights", torch.full((m,), 1.0 / m, dtype=torch.float64))
        if hp.ensemble == "general" and ctx.extra.get("holdout", 0) <= 0:
            raise ConfigError(
                "method.ensemble=general fits its weights on held-out training images: set data.holdout=N "
                "(e.g. data.holdout=5000) to withhold the last N training images from training"
            )

    def _deploy_index(self, hp: KDCLParams, model: str) -> int:
        """With ``method.models`` (the older spelling), ``model.name`` names the deployed student's network."""
        names = [str(n) for n in self.names]
        if hp.deploy_student is None:
            if model not in names:
                raise ConfigError(
                    f"model.name={model!r} is none of the students {names}; with method.models, model.name names "
                    "the network of the student to deploy (or give the cohort as model.members and pick the "
                    "student with method.deploy_student)"
                )
            return names.index(model)
        if names[hp.deploy_student] != model:
            raise ConfigError(
                f"method.deploy_student={hp.deploy_student} is a {names[hp.deploy_student]}, but model.name={model!r}; "
                f"with method.models, set model.name={names[hp.deploy_student]} (or give the cohort as model.members)"
            )
        return hp.deploy_student

    @property
    def deployed_member(self) -> int:
        return self.deploy_index

    def head_networks(self) -> dict[str, str]:
        return head_labels([f"student{i}" for i in range(len(self.students))], self.names)

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group(f"student{i}", s.parameters(), self.ctx.optim) for i, s in enumerate(self.students)]

    def training_step(self, images: Tensor | list[Tensor], labels: Tensor, epoch: int) -> dict[str, Tensor]:
        views = as_views(images, len(self.students), "KDCL")
        logits = [s(x) for s, x in zip(self.students, views, strict=True)]
        hp: KDCLParams = self.hp
        general = self.general_weights if hp.ensemble == "general" else None
        target, weights = kdcl_target(logits, labels, hp, general)
        losses = kdcl_losses(logits, target, labels, hp)
        if weights is not None:
            losses.update({f"stat/weight{i}": w.float() for i, w in enumerate(weights)})
        return losses

    @torch.no_grad()
    def fit_on_holdout(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
        """Estimate the general rule's weights from held-out ``(images, labels)`` batches (students in eval
        mode, un-augmented images); stores and returns them."""
        was_training = self.training
        self.eval()
        m = len(self.students)
        cov = torch.zeros(m, m, dtype=torch.float64, device=self.general_weights.device)
        count = 0
        for images, labels in batches:
            probs = torch.stack([torch.softmax(s(images).double(), dim=1) for s in self.students])
            err = probs - F.one_hot(labels, probs.shape[2]).double()
            cov += torch.einsum("mbk,nbk->mn", err, err)
            count += labels.shape[0]
        self.train(was_training)
        if count == 0:
            raise ValueError("the held-out split yielded no batch")
        self.general_weights.copy_(general_weights(cov / count, self.hp.general_ridge))
        return self.general_weights.clone()

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        logits = [s(images) for s in self.students]
        heads = {f"student{i}": z for i, z in enumerate(logits)}
        heads.update(ensemble_heads(logits))
        return heads

    def oracle_groups(self) -> dict[str, list[str]]:
        return {"oracle_any_student": [f"student{i}" for i in range(len(self.students))]}

    def deployable(self) -> nn.Module:
        return self.students[self.deploy_index]
