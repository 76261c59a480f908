"""SwitOKD's three-network variants (paper Table 7), ``docs/methods.md#switokd``: ``switokd_1t2s`` and
``switokd_2t1s``.

Each (teacher, student) pair takes SwitOKD's switch of ``okd/methods/switokd.py`` (batch-mean distances at T = 1,
eps = exp(-d_t / (d_t + d_s)), delta = d_s - eps * d_t, expert iff G > delta and d_t < d_s). Every KL is at T = 1,
a batch mean with a detached target and no T^2.

1T2S, ``model.members`` = [teacher T, student A, student B] (official: WRN-16-10, WRN-16-2, MobileNet v1). Pair
1 = (T, A) sets w1 = 0 if expert else 1, pair 2 = (T, B) sets w2; w0 = 0 iff w1 = w2 = 0. The teacher minimises
w0 CE + w2 KL(z_B -> z_T) + w1 KL(z_A -> z_T) and always steps: on an all-zero loss its SGD still applies weight
decay and momentum (official code). Each student minimises CE + the KLs to the two other networks and steps. The
official code takes pair 1's eps from pair 2's distances; ``fix_eps_pairing=true`` uses pair 1's own.

2T1S, ``model.members`` = [teacher A, teacher B, student S] (official: WRN-16-2, WRN-16-10, MobileNet v1).
Teacher k is paused (no backward, no step, its optimizer state untouched) iff its pair (k, S) is in expert mode;
otherwise it minimises CE + KL(z_S -> z_k) + KL(z_other teacher -> z_k). S minimises CE + both KLs and always
steps. Step order A, B, S. The official code takes pair B's eps from pair A's distances (``fix_eps_pairing``).

The last member (the MobileNet) trains with Adam lr 0.01, wd 1e-4 (coupled L2) in the official scripts; the others
with the run's SGD. Under DDP the pair statistics are global batch means, so every rank makes the same
decisions (2T1S: one wrapper per network; 1T2S: the trainer's one wrapper). A paused network's BN running
statistics still move (its forward runs in train mode, as in the official code). ``deploy.pt`` holds the last member.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from okd.errors import ConfigError
from okd.methods.base import Method, MethodContext, ParamGroup, adam_group, register_method, sgd_group
from okd.methods.switokd import expert_mode, switch_statistics
from okd.models import create_model
from okd.models.members import head_labels
from okd.nn.losses import cross_entropy, kl_div_t


@dataclass
class SwitOKDMultiParams:
    #: false: the official code's eps pairing copy-paste (see the module docstring) | true: each pair its own eps
    fix_eps_pairing: bool = False
    #: true: expert mode also needs d_t < d_s (official code) | false: G > delta alone (README's formula)
    teacher_closer_guard: bool = True
    #: the last member's optimizer: adam (official: lr 0.01, wd 1e-4, coupled L2) | sgd (the run's SGD settings)
    last_optimizer: str = "adam"
    #: the last member's Adam lr and weight decay (only with last_optimizer=adam)
    last_lr: float = 0.01
    last_weight_decay: float = 1e-4

    def validate(self) -> None:
        if self.last_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"method.last_optimizer must be 'adam' or 'sgd', got {self.last_optimizer!r}")
        if not (math.isfinite(self.last_lr) and self.last_lr > 0):
            raise ConfigError(f"method.last_lr must be a positive lr, got {self.last_lr}")
        if not (math.isfinite(self.last_weight_decay) and self.last_weight_decay >= 0):
            raise ConfigError(f"method.last_weight_decay must be >= 0, got {self.last_weight_decay}")


def with_epsilon_of(stats: dict, source: dict) -> dict:
    """``stats`` with eps taken from ``source``'s distances and delta recomputed (the official pairing quirk)."""
    epsilon = torch.exp(-(source["d_t"] / (source["d_t"] + source["d_s"])))
    return {**stats, "epsilon": epsilon, "delta": stats["d_s"] - epsilon * stats["d_t"]}


def pair_switches(
    logits: list[Tensor], pairs: list[tuple[int, int]], labels: Tensor, num_classes: int, hp, global_batch: bool
) -> tuple[list[dict], list[Tensor]]:
    """The statistics and the expert decision (0-d bool tensors) of each (teacher, student) pair in ``pairs``;
    without ``hp.fix_eps_pairing`` the first pair listed takes its eps from the second pair's distances (the
    callers list the pair that borrows first)."""
    stats = [switch_statistics(logits[t], logits[s], labels, num_classes, global_batch) for t, s in pairs]
    if not hp.fix_eps_pairing:
        stats[0] = with_epsilon_of(stats[0], stats[1])
    return stats, [expert_mode(s, hp.teacher_closer_guard) for s in stats]


def peer_losses(logits: list[Tensor], labels: Tensor, i: int) -> dict[str, Tensor]:
    """Network i's CE and its KL (T = 1, no T^2, detached target) to every other network j, keyed ``kl{j}``."""
    out = {"ce": cross_entropy(logits[i], labels)}
    for j, z in enumerate(logits):
        if j != i:
            out[f"kl{j}"] = kl_div_t(logits[i], z, 1.0, detach_target=True, scale_t2=False)
    return out


class _SwitOKDThree(Method):
    """Shared by both variants: three networks from ``model.members``, the last one on Adam by default."""

    Params = SwitOKDMultiParams
    mixed_cohort = None  # any three networks: only their logits meet
    HEADS: tuple[str, str, str]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.networks = ctx.cohort(3)
        self.nets = nn.ModuleList(create_model(n, ctx.num_classes) for n in self.networks)
        #: under DDP: each network's own wrapper (a plain list: not submodules, no state keys)
        self.ddp: list[nn.Module] = []

    @classmethod
    def cohort_size(cls, params) -> int:
        return 3

    @property
    def deployed_member(self) -> int:
        return 2

    def head_networks(self) -> dict[str, str]:
        return head_labels(list(self.HEADS), self.networks)

    def param_groups(self) -> list[ParamGroup]:
        groups = [sgd_group(h, net.parameters(), self.ctx.optim) for h, net in zip(self.HEADS, self.nets, strict=True)]
        if self.hp.last_optimizer == "adam":
            groups[2] = adam_group(self.HEADS[2], self.nets[2].parameters(), self.hp.last_lr, self.hp.last_weight_decay)
        return groups

    def forwards(self, images: Tensor) -> list[Tensor]:
        return [net(images) for net in (self.ddp or self.nets)]

    def distribute_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """One DDP wrapper per network; the statistics are global batch means, so every rank makes the same
        decisions and a paused network's wrapper is left out of the backward on every rank."""
        self.ddp = [wrap(net) for net in self.nets]

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {h: net(images) for h, net in zip(self.HEADS, self.nets, strict=True)}

    def deployable(self) -> nn.Module:
        return self.nets[2]


def _logged(stats: list[dict], experts: list[Tensor]) -> dict[str, Tensor]:
    out = {}
    for p, (s, e) in enumerate(zip(stats, experts, strict=True), start=1):
        out.update({f"stat/pair{p}_{k}": v for k, v in s.items()})
        out[f"stat/pair{p}_expert"] = e.float()
    return out


@register_method(
    "switokd_1t2s",
    description="SwitOKD 1T2S: one teacher, two students; the teacher's terms are switched off per pair",
    paper="Qian, Wang, Yin, Hong, Wang. Switchable Online Knowledge Distillation. ECCV 2022 (Table 7)",
)
class SwitOKD1T2S(_SwitOKDThree):
    HEADS = ("teacher", "student1", "student2")
    deploy_head = "student2"

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """All three forwards and losses; the teacher's terms carry w0, w1, w2 (one summed backward, every
        optimizer steps, the teacher's too, as in the official code)."""
        z = self.forwards(images)
        # one DDP wrapper round the whole method here (no manual step): global statistics whenever distributed
        distributed = bool(self.ddp) or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        stats, experts = pair_switches(z, [(0, 1), (0, 2)], labels, self.ctx.num_classes, self.hp, distributed)
        w1, w2 = (~experts[0]).to(z[0].dtype), (~experts[1]).to(z[0].dtype)
        w0 = torch.maximum(w1, w2)
        teacher = peer_losses(z, labels, 0)
        losses = {
            "teacher/ce": w0 * teacher["ce"],
            "teacher/kl1": w1 * teacher["kl1"],
            "teacher/kl2": w2 * teacher["kl2"],
        }
        for i, head in ((1, "student1"), (2, "student2")):
            losses.update({f"{head}/{k}": v for k, v in peer_losses(z, labels, i).items()})
        losses.update(_logged(stats, experts))
        losses.update({"stat/w0": w0.detach(), "stat/w1": w1.detach(), "stat/w2": w2.detach()})
        return losses


@register_method(
    "switokd_2t1s",
    description="SwitOKD 2T1S: two teachers, one student; each teacher pauses (no step) when its pair's gap exceeds "
    "the threshold",
    paper="Qian, Wang, Yin, Hong, Wang. Switchable Online Knowledge Distillation. ECCV 2022 (Table 7)",
)
class SwitOKD2T1S(_SwitOKDThree):
    HEADS = ("teacher1", "teacher2", "student")
    deploy_head = "student"
    ddp_per_network = True  # one wrapper per network (distribute_networks): a paused teacher's reduces nothing

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """All three forwards, losses and switches; a paused teacher's terms are multiplied by 0 (``manual_step``
        leaves them out of the backward and skips that teacher's optimizer)."""
        z = self.forwards(images)
        # pair 2 = (teacher2, student) borrows pair 1's distances: list it first for pair_switches
        stats, experts = pair_switches(z, [(1, 2), (0, 2)], labels, self.ctx.num_classes, self.hp, bool(self.ddp))
        stats, experts = stats[::-1], experts[::-1]  # back to pair 1 = teacher1's, pair 2 = teacher2's
        losses = {}
        for i, head in enumerate(self.HEADS):
            active = (~experts[i]).to(z[i].dtype) if i < 2 else None
            for k, v in peer_losses(z, labels, i).items():
                losses[f"{head}/{k}"] = v if active is None else v * active
        losses.update(_logged(stats, experts))
        return losses

    @property
    def manual_optimization(self) -> bool:
        return True

    def manual_step(self, images: Tensor, labels: Tensor, epoch: int, runner) -> dict[str, Tensor]:
        """Backward the active networks' losses (a paused teacher's gradients stay None) and step their
        optimizers in the official order: teacher1, teacher2, student."""
        losses = self.training_step(images, labels, epoch)
        paused = [bool(losses["stat/pair1_expert"]), bool(losses["stat/pair2_expert"]), False]  # one host sync
        active = [i for i in range(3) if not paused[i]]
        runner.zero_grad()
        heads = [self.HEADS[i] for i in active]
        runner.backward(sum(v for k, v in losses.items() if k.split("/")[0] in heads))
        runner.step_optimizer(active)
        return {k: v.detach() for k, v in losses.items()}
