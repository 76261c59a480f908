"""MACs of one real training step (the FLOPs convention of ``okd bench``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from okd.bench.data import Split, num_classes_of, okd_loader
from okd.config import Config
from okd.methods import METHODS
from okd.methods.build import build_method
from okd.models.complexity import _layer_macs


@dataclass
class MacCount:
    """Per-image MACs of one training forward; ``no_grad`` is the part run without a graph (targets)."""

    total: int
    no_grad: int


def count_step_macs(
    method: nn.Module, images: Tensor | list[Tensor], labels: Tensor, epoch: int = 0, backward: bool = False
) -> MacCount:
    """MACs per image of Conv2d / ConvTranspose2d / Linear over one real ``training_step`` forward.

    Counted as ``okd.models.complexity`` defines them, with hooks on every such module of the method (all
    networks and auxiliary modules). The step runs on ``method`` itself (its BN running statistics move); with
    ``backward`` the summed loss is backpropagated too (initialises the backward kernels, no optimizer step).
    """

    total = no_grad = 0

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        nonlocal total, no_grad
        macs = _layer_macs(module, args[0], out)
        total += macs
        if not torch.is_grad_enabled():
            no_grad += macs

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in method.modules() if isinstance(m, kinds)]
    try:
        method.train()
        losses = method.training_step(images, labels, epoch)
    finally:
        for h in handles:
            h.remove()
    if backward:
        sum(v for k, v in losses.items() if not k.startswith("stat/")).backward()
    n = labels.shape[0]
    return MacCount(total // n, no_grad // n)


def cohort_macs(cfg: Config, split: Split, device: torch.device) -> MacCount:
    """:func:`count_step_macs` of the config's method on one batch of ``split`` (fp32, eager, contiguous)."""
    views = METHODS.get(cfg.method_name).views_for(cfg.method_params)
    loader = okd_loader(split, dataclasses.replace(cfg, run=contiguous_run(cfg)), device, views)
    x, y = next(iter(loader))
    method = build_method(cfg, num_classes_of(cfg)).to(device)
    macs = count_step_macs(method, x, y, backward=True)  # the backward: one-time setup is not charged to a path
    del method, loader, x, y
    return macs


def contiguous_run(cfg: Config):
    return dataclasses.replace(cfg.run, train=dataclasses.replace(cfg.run.train, channels_last=False))
