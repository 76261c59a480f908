"""Learning-rate schedules (``optim.schedule``; FFSD's ImageNet recipe: ``docs/methods.md#ffsd``, FFSD.9).

- ``multistep``: ``MultiStepLR(milestones, gamma)``, stepped once per epoch (the CIFAR recipes).
- ``ffsd_imagenet_code``: the official FFSD ImageNet trainer (``adjust_learning_rates``), set every iteration.
  With e the 1-based epoch, s the iteration in the epoch and N the iterations per epoch:
  ``lr = base * 0.1 ** (e // 30 + [e >= 80])``, times ``(1 + s + e*N) / (5*N)`` while ``e < 5``. The warm-up
  therefore covers epochs 1-4 and starts near 0.2 * base; decays fall at the start of epochs 30, 60 and 80.
  Fixed constants: ``milestones``, ``gamma`` and ``warmup_epochs`` are not used.
- ``ffsd_imagenet_paper``: the paper's wording (Goyal et al.-style): lr rises linearly per iteration over
  ``warmup_epochs`` to base (``(t + 1) / (warmup_epochs * N)`` at global iteration t, so the first step is
  not at 0), then ``x gamma`` at each milestone (0-based epoch counts, as ``MultiStepLR``: ``milestones=[30,
  60]`` decays after 30 and 60 trained epochs). The paper pairs it with base 0.8 at batch 256.
- ``cosine``: MCL/L-MCL's per-epoch cosine (``docs/methods.md#mcl``): ``lr(e) = base * 0.5 * (1 + cos(pi e /
  E))`` for the 0-based epoch e of E = ``train.epochs``, set at the start of every epoch and constant within it,
  in every param group (the reference sets only the first group; its optimizers have one). No warm-up;
  ``milestones``, ``gamma`` and ``warmup_epochs`` are not used.

The per-iteration schedules are closed-form in the scheduler's step counter, whose state (``last_epoch``
counts optimizer steps) resumes exactly through ``state_dict``/``load_state_dict``; their state holds only
numbers, so checkpoints need no custom classes.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

from okd.config import OptimConfig
from okd.errors import ConfigError

SCHEDULES = ("multistep", "ffsd_imagenet_code", "ffsd_imagenet_paper", "cosine")


def ffsd_code_lr(base_lr: float, epoch: int, step: int, len_epoch: int) -> float:
    """The official FFSD ImageNet lr, computed in the code's own order (bitwise identical).

    ``epoch`` is 1-based, ``step`` the 0-based iteration in the epoch, ``len_epoch`` the code's
    ``len(dataset) // batch_size``.
    """
    factor = epoch // 30
    if epoch >= 80:
        factor = factor + 1
    lr = base_lr * (0.1**factor)
    if epoch < 5:
        lr = lr * float(1 + step + epoch * len_epoch) / (5.0 * len_epoch)
    return lr


def paper_lr(
    base_lr: float, epoch: int, step: int, steps_per_epoch: int, warmup_epochs: int, milestones: list[int], gamma: float
) -> float:
    """The paper's reading: linear warm-up over ``warmup_epochs`` then step decay (``epoch`` 0-based)."""
    lr = base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    t = epoch * steps_per_epoch + step
    warm = warmup_epochs * steps_per_epoch
    if t < warm:
        lr = lr * (t + 1) / warm
    return lr


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """MCL's per-epoch cosine, in the reference's order of operations: base * 0.5 * (1 + cos(pi e / E))."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class EpochCosineLR(LRScheduler):
    """``cosine_lr`` of the 0-based epoch ``last_epoch``; ``step()`` once per epoch. State: numbers only."""

    def __init__(self, optimizer: Optimizer, epochs: int, last_epoch: int = -1) -> None:
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.epochs = int(epochs)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # closed form: never chained on the current lr
        return [cosine_lr(base, self.last_epoch, self.epochs) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume at the saved epoch, keeping this run's E: a run extended on resume (``train.epochs`` raised)
        follows the cosine of its new length from the next epoch on (the optimizer's lr is set to it)."""
        epochs = self.epochs
        super().load_state_dict(state_dict)
        self.epochs = epochs
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    _get_closed_form_lr = get_lr


class IterationLR(LRScheduler):
    """A per-iteration schedule; ``step()`` after every optimizer step. ``last_epoch`` counts iterations.

    Iteration t maps to ``(epoch, step) = divmod(t, steps_per_epoch)`` (0-based), so ``steps_per_epoch``
    must be the number of optimizer steps the trainer really takes per epoch.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        kind: str,
        steps_per_epoch: int,
        *,
        len_epoch: int | None = None,
        warmup_epochs: int = 0,
        milestones: list[int] | tuple[int, ...] = (),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if kind not in ("ffsd_imagenet_code", "ffsd_imagenet_paper"):
            raise ValueError(f"unknown per-iteration schedule {kind!r}")
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.kind = kind
        self.steps_per_epoch = int(steps_per_epoch)
        self.len_epoch = int(len_epoch) if len_epoch is not None else self.steps_per_epoch
        if self.len_epoch <= 0:
            raise ValueError(f"len_epoch must be positive, got {self.len_epoch}")
        self.warmup_epochs = int(warmup_epochs)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, iteration: int) -> float:
        epoch, step = divmod(int(iteration), self.steps_per_epoch)
        if self.kind == "ffsd_imagenet_code":
            return ffsd_code_lr(base_lr, epoch + 1, step, self.len_epoch)
        return paper_lr(base_lr, epoch, step, self.steps_per_epoch, self.warmup_epochs, self.milestones, self.gamma)

    def get_lr(self) -> list[float]:  # closed form: never chained on the current lr
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_scheduler(
    optimizer: Optimizer,
    optim_cfg: OptimConfig,
    steps_per_epoch: int,
    *,
    schedule: str | None = None,
    len_epoch: int | None = None,
    epochs: int | None = None,
) -> tuple[LRScheduler, bool]:
    """The scheduler of ``optim_cfg.schedule`` (or ``schedule``) and whether it is stepped per iteration.

    ``per_step`` True: call ``scheduler.step()`` after every optimizer step (never per epoch); False: once
    per epoch. ``steps_per_epoch`` is the number of optimizer steps per epoch actually taken (the train
    loader's length, capped by ``train.max_steps_per_epoch``). ``len_epoch`` is the ``N`` of the code
    formula, default ``steps_per_epoch``; the official code used ``len(dataset) // batch_size`` with a
    loader that kept the last partial batch, i.e. ``steps_per_epoch - 1`` when the split is not divisible.
    ``epochs`` (the run's ``train.epochs``) is the E of ``cosine``.
    """
    kind = schedule if schedule is not None else optim_cfg.schedule
    if kind == "constant":  # never decays (a per-epoch MultiStepLR without milestones: plain-number state)
        return MultiStepLR(optimizer, milestones=[], gamma=optim_cfg.gamma), False
    if kind == "multistep":
        return MultiStepLR(optimizer, milestones=list(optim_cfg.milestones), gamma=optim_cfg.gamma), False
    if kind == "cosine":
        if epochs is None or epochs <= 0:
            raise ConfigError(f"optim.schedule=cosine needs train.epochs > 0, got {epochs}")
        return EpochCosineLR(optimizer, epochs), False
    if kind in ("ffsd_imagenet_code", "ffsd_imagenet_paper"):
        if optim_cfg.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {optim_cfg.warmup_epochs}")
        sched = IterationLR(
            optimizer,
            kind,
            steps_per_epoch,
            len_epoch=len_epoch,
            warmup_epochs=optim_cfg.warmup_epochs,
            milestones=list(optim_cfg.milestones),
            gamma=optim_cfg.gamma,
        )
        return sched, True
    raise ConfigError(f"optim.schedule={kind!r} is not valid; choose one of: {', '.join(SCHEDULES)}")


def current_lrs(scheduler: LRScheduler) -> list[float]:
    """The learning rates the next optimizer step will use (one per param group)."""
    return [float(g["lr"]) for g in scheduler.optimizer.param_groups]


__all__ = [
    "EpochCosineLR",
    "IterationLR",
    "SCHEDULES",
    "build_scheduler",
    "cosine_lr",
    "current_lrs",
    "ffsd_code_lr",
    "paper_lr",
]
