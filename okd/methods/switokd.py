"""SwitOKD: Switchable Online Knowledge Distillation (Qian et al., ECCV 2022), ``docs/methods.md#switokd``.

A teacher t (``model.members`` entry 1) and a student s (entry 2), two independent networks with their own SGD
optimizers, see the same batch. From their detached logits at T = 1 and the one-hot labels y (K = the run's class
count) every step computes batch means

    d_s = mean_b ||p_s - y||_1,   d_t = mean_b ||p_t - y||_1,   G = mean_b ||p_s - p_t||_1,
    eps = exp(-d_t / (d_t + d_s)),   delta = d_s - eps * d_t.

Expert mode iff G > delta and d_t < d_s (the second condition is in the official code, not in the README's
formula): the teacher is paused (no loss, no backward, no optimizer step, so no momentum or weight-decay
update either). Learning mode otherwise: the teacher minimises CE(z_t, y) + KL(z_s.detach -> z_t) and steps.
The student minimises CE(z_s, y) + KL(z_t.detach -> z_s) and steps in both modes. Both KLs are batch means at
T = 1 without T^2. The teacher's forward runs in train mode in both modes, so a paused teacher's BatchNorm
running statistics still move (the official code); ``freeze_teacher_bn_in_expert=true`` restores them.

The method drives its optimizers itself (``manual_step``), because skipping an optimizer step depends on the
batch. Under DDP each network has its own wrapper and the statistics are global batch means (``global_means``),
so every rank takes the same mode and a paused teacher's wrapper is left out on every rank. Defaults follow the
official CIFAR scripts; the student's lr is ``student_lr`` (0.01 in the CIFAR-100 script, the run's lr in the
CIFAR-10 one). ``deploy.pt`` holds the student.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.models import create_model
from okd.models.members import head_labels
from okd.nn.distances import label_l1, one_hot, prob_l1
from okd.nn.losses import cross_entropy, kl_div_t

TEACHER, STUDENT = 0, 1  # optimizer indices (the order of param_groups) and member indices


@dataclass
class SwitOKDParams:
    #: null: the run's optim.lr (CIFAR-10 script: 0.1 for both) | 0.01 (CIFAR-100 script; its teacher keeps 0.1)
    student_lr: float | None = None
    #: true: expert mode also needs d_t < d_s (official code) | false: G > delta alone (README's formula)
    teacher_closer_guard: bool = True
    #: false: a paused teacher's BN running statistics still move (official code) | true: they are restored
    freeze_teacher_bn_in_expert: bool = False

    def validate(self) -> None:
        if self.student_lr is not None and not (math.isfinite(self.student_lr) and self.student_lr > 0):
            raise ConfigError(f"method.student_lr must be a positive lr or null (the run's), got {self.student_lr}")


def switch_statistics(
    teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, num_classes: int, global_batch: bool = False
) -> dict:
    """d_s, d_t, G, eps and delta of one batch (batch means, T = 1), from detached logits. ``global_batch``: this
    process holds one shard of a distributed batch; the means are then over every rank's images (the per-rank
    sums and image counts are all-reduced), so every rank computes the same statistics and takes the same mode."""
    z_t, z_s = teacher_logits.detach(), student_logits.detach()
    y = one_hot(labels, num_classes, z_s)
    d_s, d_t, gap = label_l1(z_s, y), label_l1(z_t, y), prob_l1(z_t, z_s)
    if global_batch:
        d_s, d_t, gap = global_means((d_s, d_t, gap), labels.shape[0])
    epsilon = torch.exp(-(d_t / (d_t + d_s)))
    return {"d_s": d_s, "d_t": d_t, "gap": gap, "epsilon": epsilon, "delta": d_s - epsilon * d_t}


def global_means(means: tuple[Tensor, ...], count: int) -> tuple[Tensor, ...]:
    """Means over ``count`` local images turned into means over every rank's images: one all-reduce of the sums
    and the count (the sum is the same on every rank, so is each mean)."""
    sums = torch.stack([*(m * count for m in means), means[0].new_tensor(float(count))])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return tuple(sums[:-1] / sums[-1])


def expert_mode(stats: dict, teacher_closer_guard: bool = True) -> Tensor:
    """True (a 0-d bool tensor) when the teacher is paused: G > delta (and d_t < d_s with the guard)."""
    expert = stats["gap"] > stats["delta"]
    return expert & (stats["d_t"] < stats["d_s"]) if teacher_closer_guard else expert


def switokd_losses(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Each network's CE and KL (T = 1, no T^2) to the other's detached prediction, unweighted and unmasked."""
    return {
        "teacher/ce": cross_entropy(teacher_logits, labels),
        "teacher/kl": kl_div_t(teacher_logits, student_logits, 1.0, detach_target=True, scale_t2=False),
        "student/ce": cross_entropy(student_logits, labels),
        "student/kl": kl_div_t(student_logits, teacher_logits, 1.0, detach_target=True, scale_t2=False),
    }


@register_method(
    "switokd",
    description="SwitOKD: a teacher and a student; the teacher pauses (no step) when the gap exceeds an adaptive "
    "threshold",
    paper="Qian, Wang, Yin, Hong, Wang. Switchable Online Knowledge Distillation. ECCV 2022",
)
class SwitOKD(Method):
    Params = SwitOKDParams
    mixed_cohort = None  # any two networks: only their logits meet
    deploy_head = "student"
    ddp_per_network = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.networks = ctx.cohort(2)
        self.teacher = create_model(self.networks[TEACHER], ctx.num_classes)
        self.student = create_model(self.networks[STUDENT], ctx.num_classes)
        #: under DDP: the teacher's and the student's own wrappers (a plain list: not submodules, no state keys)
        self.ddp: list[nn.Module] = []

    @classmethod
    def cohort_size(cls, params) -> int:
        return 2

    @property
    def deployed_member(self) -> int:
        return STUDENT

    def head_networks(self) -> dict[str, str]:
        return head_labels(["teacher", "student"], self.networks)

    def param_groups(self) -> list[ParamGroup]:
        teacher = sgd_group("teacher", self.teacher.parameters(), self.ctx.optim)
        student = sgd_group("student", self.student.parameters(), self.ctx.optim)
        if self.hp.student_lr is not None:
            student.lr = self.hp.student_lr
        return [teacher, student]

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """Both forwards, the loss terms and the switch statistics of one step; the teacher's terms are multiplied
        by 0 in expert mode (``manual_step`` then leaves them out of the backward and skips its optimizer)."""
        teacher, student = self.ddp or (self.teacher, self.student)
        z_t, z_s = teacher(images), student(images)
        stats = switch_statistics(z_t, z_s, labels, self.ctx.num_classes, global_batch=bool(self.ddp))
        expert = expert_mode(stats, self.hp.teacher_closer_guard)
        losses = switokd_losses(z_t, z_s, labels)
        learning = (~expert).float()
        losses["teacher/ce"] = losses["teacher/ce"] * learning
        losses["teacher/kl"] = losses["teacher/kl"] * learning
        losses.update({f"stat/{k}": v for k, v in stats.items()})  # at least float32 already
        losses["stat/expert"] = expert.float()
        return losses

    @property
    def manual_optimization(self) -> bool:
        return True

    def manual_step(self, images: Tensor, labels: Tensor, epoch: int, runner) -> dict[str, Tensor]:
        """The official order: both forwards; in learning mode backward both losses, step the teacher then the
        student; in expert mode backward the student's loss and step the student only (the teacher's gradients
        stay None and its optimizer state is untouched)."""
        saved = None
        if self.hp.freeze_teacher_bn_in_expert:
            saved = [b.clone() for b in self.teacher.buffers()]
        losses = self.training_step(images, labels, epoch)
        expert = bool(losses["stat/expert"])  # one host sync per step: it decides which optimizers step
        runner.zero_grad()
        if expert:
            if saved is not None:
                with torch.no_grad():
                    for buffer, old in zip(self.teacher.buffers(), saved, strict=True):
                        buffer.copy_(old)
            runner.backward(losses["student/ce"] + losses["student/kl"])
            runner.step_optimizer(STUDENT)
        else:
            runner.backward(sum(v for k, v in losses.items() if not k.startswith("stat/")))
            runner.step_optimizer()  # the teacher's, then the student's (one grad-scaler update with fp16)
        return {k: v.detach() for k, v in losses.items()}

    def distribute_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """One DDP wrapper per network: a paused teacher takes no backward, so no rank waits on its gradients'
        all-reduce, while the student's are averaged on every step. The mode is the same on every rank (the
        statistics are global batch means), so the ranks always agree on which wrappers reduce."""
        self.ddp = [wrap(self.teacher), wrap(self.student)]

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {"teacher": self.teacher(images), "student": self.student(images)}

    def deployable(self) -> nn.Module:
        return self.student
