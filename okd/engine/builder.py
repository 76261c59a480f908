"""Build a method, its optimizers and schedulers from a resolved config."""

from __future__ import annotations

import torch
from torch import nn

from okd.config import Config
from okd.errors import ConfigError
from okd.methods import METHODS, Method, MethodContext, ParamGroup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def build_method(cfg: Config, num_classes: int) -> Method:
    cls = METHODS.get(cfg.method_name)
    ctx = MethodContext(
        model=cfg.run.model.name,
        num_classes=num_classes,
        optim=cfg.run.optim,
        params=cfg.method_params,
        epochs=cfg.run.train.epochs,
    )
    return cls(ctx)


def _check_groups(method: Method, groups: list[ParamGroup]) -> None:
    seen: dict[int, str] = {}
    for group in groups:
        for p in group.params:
            if id(p) in seen:
                raise RuntimeError(f"parameter in both groups {seen[id(p)]!r} and {group.name!r}")
            seen[id(p)] = group.name
    orphans = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in seen]
    if orphans:
        raise RuntimeError(f"trainable parameters in no optimizer group: {orphans[:5]}")


def build_optimizer(group: ParamGroup) -> torch.optim.Optimizer:
    if group.optimizer == "sgd":
        return torch.optim.SGD(
            group.params,
            lr=group.lr,
            momentum=group.momentum,
            nesterov=group.nesterov and group.momentum > 0,
            weight_decay=group.weight_decay,
        )
    if group.optimizer == "adam":
        return torch.optim.Adam(
            group.params, lr=group.lr, betas=group.betas, eps=group.eps, weight_decay=group.weight_decay
        )
    raise ValueError(f"unknown optimizer {group.optimizer!r} in group {group.name!r}")


def build_optimization(
    method: Method, cfg: Config
) -> tuple[list[str], list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
    """One optimizer per parameter group, each with MultiStepLR stepped once per epoch."""
    groups = [g for g in method.param_groups() if g.params]
    _check_groups(method, groups)
    optimizers = [build_optimizer(g) for g in groups]
    milestones = list(cfg.run.optim.milestones)
    schedulers = [
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.run.optim.gamma)
        for opt in optimizers
    ]
    return [g.name for g in groups], optimizers, schedulers


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
