"""Optimizer implementations for a cohort: for-loop vs ``foreach`` vs ``fused`` SGD/Adam (issue 6, fused step).

Times (1) ``optimizer.step()`` of every parameter group of the config's method alone, on random gradients, and
(2) with ``--full-step``, the whole okd training step (``StepRunner.step``) with each implementation, interleaved
so that machine load hits all of them alike. Medians over repeats; nothing is written to results/.

    python benchmarks/optimizer_step.py cifar100/ffsd_resnet32 --threads 1 --full-step
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from okd.engine.builder import resolve_device
from okd.engine.step import StepRunner
from okd.methods.base import ParamGroup
from okd.methods.build import build_method, load_config

IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_optimizer(group: ParamGroup, impl: str) -> torch.optim.Optimizer:
    """The optimizer ``okd.engine.builder.build_optimizer`` makes, with an explicit implementation."""
    flags = IMPLS[impl]
    if group.optimizer == "sgd":
        return torch.optim.SGD(group.params, lr=group.lr, momentum=group.momentum, weight_decay=group.weight_decay,
                               nesterov=group.nesterov and group.momentum > 0, **flags)  # fmt: skip
    return torch.optim.Adam(group.params, lr=group.lr, betas=group.betas, eps=group.eps,
                            weight_decay=group.weight_decay, **flags)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_only(method, device: torch.device, repeats: int, steps: int) -> dict[str, float]:
    """Median ms per step of all the cohort's optimizers, per implementation."""
    groups = [g for g in method.param_groups() if g.params]
    for p in method.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {impl: [make_optimizer(g, impl) for g in groups] for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(repeats + 2):
        for impl, group_opts in opts.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                for opt in group_opts:
                    opt.step()
            sync(device)
            if r >= 2:  # two warm-up rounds (state allocation)
                times[impl].append((time.perf_counter() - t0) / steps * 1e3)
    return {impl: statistics.median(v) for impl, v in times.items()}


def full_step(cfg, device: torch.device, repeats: int, steps: int) -> dict[str, float]:
    """Median ms per okd training step (fp32 or the config's precision) per optimizer implementation."""
    num_classes = 100 if cfg.run.data.dataset == "cifar100" else 10
    batch = cfg.run.data.batch_size
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if cfg.run.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    runners = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        method = build_method(cfg, num_classes).to(device)
        if cfg.run.train.channels_last:
            method.to(memory_format=torch.channels_last)
        opts = [make_optimizer(g, impl) for g in method.param_groups() if g.params]
        runners[impl] = StepRunner(method, opts, cfg.run.train, device)
        runners[impl].step(x, y, 0)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
        for impl, runner in runners.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.step(x, y, 0)
            sync(device)
            times[impl].append((time.perf_counter() - t0) / steps * 1e3)
    return {impl: statistics.median(v) for impl, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per repeat")
    parser.add_argument("--full-step", action="store_true", help="also time whole training steps")
    parser.add_argument("--full-steps", type=int, default=2, help="training steps per repeat")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.run.train.device)
    torch.manual_seed(0)
    method = build_method(cfg, 100).to(device)
    groups = [g for g in method.param_groups() if g.params]
    n_tensors = sum(len(g.params) for g in groups)
    n_params = sum(p.numel() for g in groups for p in g.params)
    print(f"{args.config} on {device} (torch {torch.__version__}, threads {torch.get_num_threads()}): "
          f"{len(groups)} optimizers ({', '.join(f'{g.name}:{g.optimizer}' for g in groups)}), "
          f"{n_tensors} tensors, {n_params / 1e6:.2f} M parameters")  # fmt: skip
    opt_ms = optimizer_only(method, device, args.repeats, args.steps)
    print("optimizer.step() of the whole cohort, median ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in opt_ms.items()))  # fmt: skip
    if args.full_step:
        step_ms = full_step(cfg, device, args.repeats, args.full_steps)
        print("whole okd training step, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in step_ms.items()))


if __name__ == "__main__":
    main()
