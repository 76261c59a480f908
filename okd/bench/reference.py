"""The reference path: the reference repositories' DataLoader and per-component update."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from okd.bench.data import Split, cycle_reference, num_classes_of, reference_loader
from okd.bench.env import PeakMemory
from okd.bench.okd_path import build_optimizers
from okd.bench.timing import LivePath
from okd.config import Config
from okd.engine.seeding import seed_everything
from okd.methods import METHODS
from okd.methods.build import build_method


def graph_nodes(*tensors: Tensor) -> dict[int, object]:
    """The autograd nodes (``AccumulateGrad`` of parameters included) reachable from the tensors, by id.

    The node objects are returned with their ids: holding them keeps the ids unique across several walks.
    """
    seen: dict[int, object] = {}
    stack = [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(n for n, _ in node.next_functions)
    return seen


class ReferenceStep:
    """The reference code's update: per cohort component, in the loss dict's order, ``zero_grad -> backward ->
    step`` of that component's optimizer (loss keys ``<group>/...`` map to the ParamGroup named ``<group>``).

    Falls back to one backward of the sum and a step of every optimizer (what single-network reference code
    does) when a loss prefix names no group while several groups exist, or when two components' graphs share
    a node (then a per-component step would modify a tensor a later backward needs). Decided on the first step.
    """

    def __init__(self, method, group_names: list[str], optimizers: list[torch.optim.Optimizer]) -> None:
        self.method = method
        self.opts = dict(zip(group_names, optimizers, strict=True))
        self.plan: list[tuple[list[str], list[torch.optim.Optimizer]]] | None = None
        self.description = ""

    def _make_plan(self, losses: dict[str, Tensor]) -> None:
        keys = [k for k in losses if not k.startswith("stat/")]
        comps: dict[str, list[str]] = {}
        for k in keys:
            comps.setdefault(k.split("/")[0], []).append(k)
        all_opts = list(self.opts.values())
        single = (keys, all_opts)
        unknown = [p for p in comps if p not in self.opts]
        if len(self.opts) == 1 or unknown:
            why = "one optimizer" if len(self.opts) == 1 else f"loss prefixes {unknown} name no param group"
            self.plan, self.description = [single], f"1 backward + {len(all_opts)} optimizer step(s) ({why})"
            return
        reach = [graph_nodes(sum(losses[k] for k in ks)) for ks in comps.values()]
        shared = any(reach[i].keys() & reach[j].keys() for i in range(len(reach)) for j in range(i + 1, len(reach)))
        if shared:
            self.plan, self.description = [single], "1 backward + all optimizer steps (components share a graph)"
            return
        self.plan = [(ks, [self.opts[p]]) for p, ks in comps.items()]
        self.description = f"{len(comps)} x (backward + step): {', '.join(comps)}"

    def step(self, images, labels: Tensor, epoch: int) -> float:
        losses = self.method.training_step(images, labels, epoch)
        if self.plan is None:
            self._make_plan(losses)
        meter = 0.0
        for keys, opts in self.plan:
            loss = sum(losses[k] for k in keys)
            for opt in opts:
                opt.zero_grad()
            if loss.requires_grad:
                loss.backward()
            for opt in opts:
                opt.step()
            meter += loss.item()  # the reference code's AverageMeter update (a host sync on a GPU)
        self.method.after_optimizer_step()
        return meter


def start_reference(cfg: Config, split: Split, device: torch.device, warmup: int, workers: int) -> LivePath:
    """Build the reference path and run its warm-up while tracking its peak memory."""
    mem = PeakMemory(device)
    mem.start()
    seed_everything(cfg.run.seed)
    loader = reference_loader(split, cfg, device, METHODS.get(cfg.method_name).views_for(cfg.method_params), workers)
    method = build_method(cfg, num_classes_of(cfg)).to(device)
    names, optimizers = build_optimizers(method, cfg)
    ref = ReferenceStep(method, names, optimizers)
    method.train()

    def step(x, y) -> None:
        ref.step(x, y, 0)

    # PyTorch's defaults (TF32 convolutions, fp32 matmuls) plus cudnn autotuning, as reference scripts set it
    backends = {"matmul_tf32": False, "cudnn_tf32": True, "cudnn_benchmark": True}
    live = LivePath("reference", cycle_reference(loader, device), step, "fp32", False, False, "", backends=backends)
    live.warm_up(max(warmup, 1), device)  # at least one step: it decides the per-component plan
    live.peak_mem_mb = mem.peak_mb()
    live.description = f"DataLoader(workers={workers}, per-sample torch transforms), fp32 eager, {ref.description}"
    return live


def default_workers(device: torch.device) -> int:
    """Reference DataLoader workers: the reference repos' 8 on a GPU machine (capped by the cores); on the CPU,
    the cores the training threads leave free (workers on busy cores slow the step more than they help)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    return max(0, min(8, cores - torch.get_num_threads()))
