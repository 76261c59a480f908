"""The okd path: the library's StepRunner on the device-resident loader, as the trainer runs it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okd.bench.data import Split, cycle_device, num_classes_of, okd_loader
from okd.bench.env import PeakMemory
from okd.bench.timing import LivePath
from okd.config import Config
from okd.engine.builder import build_optimization
from okd.engine.seeding import seed_everything
from okd.engine.step import StepRunner, configure_backends, prepare_method
from okd.methods import METHODS
from okd.methods.build import build_method


def start_okd(cfg: Config, split: Split, device: torch.device, warmup: int, name: str = "okd") -> LivePath:
    """Build the okd path (named ``name``) and run its warm-up (compile included) while tracking its peak memory."""
    t = cfg.run.train
    mem = PeakMemory(device)
    mem.start()
    seed_everything(cfg.run.seed)
    loader = okd_loader(split, cfg, device, METHODS.get(cfg.method_name).views_for(cfg.method_params))
    configure_backends(t, device)
    method = build_method(cfg, num_classes_of(cfg)).to(device)
    _, optimizers = build_optimizers(method, cfg)
    prepare_method(method, t)
    runner = StepRunner(method, optimizers, t, device)
    method.train()
    sums: dict[str, Tensor] = {}

    def step(x, y) -> None:  # the trainer's inner loop: step, then device-side loss sums (no host sync)
        losses, total = runner.step(x, y, 0)
        n = y.shape[0]
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.detach() * n
        sums["loss"] = sums.get("loss", 0.0) + total.detach() * n

    desc = "DeviceLoader, StepRunner (1 backward of the summed loss dict, every optimizer stepped)"
    autotune = t.cudnn_benchmark and not t.deterministic
    backends = {"matmul_tf32": t.tf32, "cudnn_tf32": t.tf32, "cudnn_benchmark": autotune}
    live = LivePath(name, cycle_device(loader), step, t.precision, t.channels_last, t.compile, desc,
                     backends=backends)  # fmt: skip
    live.warm_up(warmup, device)
    live.peak_mem_mb = mem.peak_mb()
    return live


def build_optimizers(method: nn.Module, cfg: Config) -> tuple[list[str], list[torch.optim.Optimizer]]:
    """The group names and optimizers ``okd.engine.builder.build_optimization`` makes (schedules unused)."""
    built = build_optimization(method, cfg)
    if isinstance(built, tuple):  # (names, optimizers, schedulers)
        return list(built[0]), list(built[1])
    return list(built.names), list(built.optimizers)
