"""``okd bench``: time a config's training step, side by side with the standard-recipe reference path.

Two paths run in the same process, on the same device and data:

- **okd**: the library's step (``okd.engine.step.StepRunner``) on the device-resident loader, with the config's
  precision / channels_last / compile switches, one backward of the summed loss dict, every optimizer stepped,
  loss sums accumulated on the device as the trainer does.
- **reference**: the standard recipe of the reference repositories: a ``torch.utils.data.DataLoader`` over a CPU
  dataset with per-sample transforms (pad, random crop, flip, normalise; written in torch), fp32, eager,
  contiguous layout, and one ``zero_grad -> backward -> step`` per cohort component in the loss dict's order
  (FFSD: students one by one, fusion, leader, SD modules; ``methods.md`` §1.5), with a ``.item()`` per
  component as the reference code's loss meters do.

Each path is built and runs ``warmup`` untimed steps (compile warm-up included there; its peak memory is measured
here), one path after the other; then ``steps`` timed steps per path, split into ``windows`` windows that alternate
between the paths (ABBA), and the reported images/s is each path's median over its windows. Timing: CUDA events
on a GPU, wall clock on the CPU; data loading is inside the timed region for both paths. FLOPs convention: the MACs
of every Conv2d / ConvTranspose2d / Linear call of one real ``training_step`` forward (all networks and auxiliary
modules, forward-only target passes included), per image; FLOPs = 2 x MACs x 3 (forward + backward).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import gc
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okd.config import Config, load_config
from okd.data.cifar import DATASET_STATS, get_spec
from okd.data.device_loader import DeviceLoader
from okd.errors import DataError, OKDError

EPOCH_IMAGES = 50_000
FLOPS_PER_MAC = 2 * 3  # multiply + add, forward + backward (backward ~ 2x forward)
CSV_COLUMNS = [
    "timestamp", "git_commit", "hardware", "torch", "python", "device", "config", "method", "model", "path",
    "precision", "channels_last", "compile", "batch", "steps", "images_per_s", "s_per_epoch_50k", "peak_mem_mb",
    "macs_per_image", "tflops", "command", "data", "notes",
]  # fmt: skip
FLOPS_NOTE = "FLOPs = 2*MACs*3 (fwd+bwd) over Conv/ConvT/Linear MACs of one training_step forward"


# ----------------------------------------------------------------------------------------------- environment
def hardware_line(device: torch.device) -> str:
    """GPU name and memory, or the CPU model (``/proc/cpuinfo``), core count, threads and ISA level."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    isa = torch.backends.cpu.get_cpu_capability() + "".join(f"+{f}" for f in extras)
    return f"{model} ({os.cpu_count()} cpus, torch threads={torch.get_num_threads()}, {isa})"


def git_commit() -> str:
    """Short HEAD hash of the repository holding this file, ``-dirty`` if the tree has changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of one path: ``max_memory_allocated`` on a GPU; on the CPU the growth of the process's
    peak RSS over its RSS at ``start`` (after ``malloc_trim``; ``/proc/self/clear_refs`` resets the peak; else
    ``ru_maxrss``). GPU figures are exact; CPU figures are approximate (allocator caching)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_kb = 0
        self.exact = True

    @staticmethod
    def _status_kb(key: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return None

    @staticmethod
    def _release_free_heap() -> None:
        """Give freed heap pages back to the OS (glibc), so memory freed earlier is not reused unseen."""
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        rss = self._status_kb("VmRSS")
        if rss is None or not self.exact:
            self.exact = False
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.base_kb = rss

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = self._status_kb("VmHWM") if self.exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak - self.base_kb, 0) / 1024


# ------------------------------------------------------------------------------------------------------ MACs
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
    from okd.models.complexity import _layer_macs

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


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class Split:
    """The uint8 training split both paths read, and where it came from."""

    images: Tensor  # uint8 N x 3 x 32 x 32, CPU
    labels: Tensor  # int64 N, CPU
    mean: list[float]
    std: list[float]
    kind: str  # "real" | "synthetic"
    reason: str = ""


def load_split(cfg: Config, min_images: int, synthetic: bool = False) -> Split:
    """The config's training split (never downloaded: ``build_loaders`` with ``download=false``), or synthetic
    uniform uint8 images of CIFAR shape with the dataset's class count when it is absent or ``synthetic``."""
    from okd.data import build_loaders

    data = cfg.run.data
    if data.dataset not in DATASET_STATS:
        raise OKDError(f"okd bench times CIFAR configs (cifar10, cifar100); data.dataset={data.dataset!r}")
    spec = get_spec(data.dataset)
    mean = list(data.mean) if data.mean is not None else list(DATASET_STATS[spec.name][0])
    std = list(data.std) if data.std is not None else list(DATASET_STATS[spec.name][1])
    reason = "asked for (--synthetic)"
    if not synthetic:
        try:
            no_download = dataclasses.replace(data, download=False, drop_last=True)
            loader = build_loaders(no_download, cfg.run.seed, "cpu")[0]
            return Split(loader.images, loader.labels, mean, std, "real")
        except DataError as exc:
            reason = f"{data.dataset} not found under data.root={data.root!r} ({str(exc).split(':')[0]})"
    n = max(min_images, data.batch_size)
    if data.limit_train is not None:
        n = max(min(n, data.limit_train), data.batch_size)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    return Split(images, labels, mean, std, "synthetic", reason)


def okd_loader(split: Split, cfg: Config, device: torch.device, views: int) -> DeviceLoader:
    """The trainer's device-resident loader over ``split`` (full batches only)."""
    d, t = cfg.run.data, cfg.run.train
    return DeviceLoader(
        split.images, split.labels, d.batch_size, mean=split.mean, std=split.std, train=True, pad=d.pad,
        padding_mode=d.padding_mode, flip=d.flip, shuffle=True, drop_last=True, seed=cfg.run.seed, views=views,
        device=device, channels_last=t.channels_last,
    )  # fmt: skip


class ReferenceDataset(torch.utils.data.Dataset):
    """CPU dataset with the standard per-sample transforms, in torch: Pad(reflect|zeros) -> RandomCrop ->
    RandomHorizontalFlip on the uint8 image, then ToTensor (/255) and Normalize; ``views`` draws per image."""

    def __init__(self, split: Split, pad: int, padding_mode: str, flip: bool, views: int = 1) -> None:
        self.images, self.labels = split.images, split.labels
        self.mean = torch.tensor(split.mean).view(3, 1, 1)
        self.std = torch.tensor(split.std).view(3, 1, 1)
        self.pad, self.mode, self.flip, self.views = pad, padding_mode, flip, views

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, img: Tensor) -> Tensor:
        c, h, w = img.shape
        x = img
        if self.pad:
            p = self.pad
            if self.mode == "reflect":  # reflection padding needs a float input
                x = F.pad(x.unsqueeze(0).float(), (p, p, p, p), mode="reflect").squeeze(0)
            else:
                x = F.pad(x, (p, p, p, p))
        i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return ((x.float() / 255.0 - self.mean) / self.std).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor | list[Tensor], Tensor]:
        img = self.images[index]
        xs = [self.transform(img) for _ in range(self.views)]
        return (xs[0] if self.views == 1 else xs), self.labels[index]


def reference_loader(split: Split, cfg: Config, device: torch.device, views: int, workers: int):
    """``torch.utils.data.DataLoader`` as the reference trainers use it (shuffle, workers, pinned on a GPU)."""
    d = cfg.run.data
    dataset = ReferenceDataset(split, d.pad, d.padding_mode, d.flip, views)
    return torch.utils.data.DataLoader(
        dataset, batch_size=d.batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.run.seed),
    )  # fmt: skip


def _cycle_device(loader: DeviceLoader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _cycle_reference(loader, device: torch.device) -> Iterator:
    def move(x):
        return [v.to(device, non_blocking=True) for v in x] if isinstance(x, list) else x.to(device, non_blocking=True)

    while True:
        for x, y in loader:
            yield move(x), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------- the reference step
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


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class PathResult:
    """One path's figures."""

    path: str  # okd | reference
    precision: str
    channels_last: bool
    compile: bool
    steps: int
    images_per_s: float
    window_images_per_s: list[float]
    peak_mem_mb: float
    description: str = ""
    syncs: int | None = None  # synchronising CUDA calls seen in one okd step (None: not checked)

    @property
    def s_per_epoch(self) -> float:
        return EPOCH_IMAGES / self.images_per_s if self.images_per_s > 0 else math.inf


@dataclass
class _LivePath:
    """A built, warmed-up path: its batches, its step, and what it measured so far."""

    name: str
    batches: Iterator
    step: Callable[[Tensor | list[Tensor], Tensor], None]
    precision: str
    channels_last: bool
    compile: bool
    description: str
    peak_mem_mb: float = 0.0
    windows: list[tuple[float, int]] = field(default_factory=list)
    syncs: int | None = None
    backends: dict[str, bool] = field(default_factory=dict)  # CUDA backend flags set before each of its runs

    def _set_backends(self, device: torch.device) -> None:
        if device.type == "cuda" and self.backends:
            torch.backends.cuda.matmul.allow_tf32 = self.backends["matmul_tf32"]
            torch.backends.cudnn.allow_tf32 = self.backends["cudnn_tf32"]
            torch.backends.cudnn.benchmark = self.backends["cudnn_benchmark"]

    def warm_up(self, steps: int, device: torch.device) -> None:
        self._set_backends(device)
        for _ in range(steps):
            x, y = next(self.batches)
            self.step(x, y)
        _sync(device)

    def timed_window(self, steps: int, device: torch.device) -> None:
        """``steps`` steps, data loading included: CUDA events on a GPU, wall clock on the CPU."""
        self._set_backends(device)
        images = 0
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(self.batches)
            self.step(x, y)
            images += y.shape[0]
        if device.type == "cuda":
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            seconds = time.perf_counter() - t0
        self.windows.append((seconds, images))

    def result(self, steps: int) -> PathResult:
        rates = [n / sec for sec, n in self.windows if sec > 0]
        rate = statistics.median(rates) if rates else 0.0
        return PathResult(self.name, self.precision, self.channels_last, self.compile, steps, rate, rates,
                          self.peak_mem_mb, self.description, self.syncs)  # fmt: skip


@dataclass
class BenchReport:
    """Both paths of one ``okd bench`` run and its context."""

    config: str
    method: str
    model: str
    batch: int
    device: torch.device
    macs: MacCount
    data: Split
    results: list[PathResult] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def tflops(self, r: PathResult) -> float:
        return FLOPS_PER_MAC * self.macs.total * r.images_per_s / 1e12


def _count_syncs(live: _LivePath, device: torch.device) -> int | None:
    """Synchronising CUDA calls in one step (``torch.cuda.set_sync_debug_mode``); None off a GPU."""
    if device.type != "cuda":
        return None
    x, y = next(live.batches)
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            live.step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _start_okd(cfg: Config, split: Split, device: torch.device, warmup: int) -> _LivePath:
    """Build the okd path and run its warm-up (compile included) while tracking its peak memory."""
    from okd.engine.builder import build_method
    from okd.engine.seeding import seed_everything
    from okd.engine.step import StepRunner, configure_backends, prepare_method
    from okd.methods import METHODS

    t = cfg.run.train
    mem = _PeakMemory(device)
    mem.start()
    seed_everything(cfg.run.seed)
    loader = okd_loader(split, cfg, device, METHODS.get(cfg.method_name).views)
    configure_backends(t, device)
    method = build_method(cfg, _num_classes(cfg)).to(device)
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
    live = _LivePath("okd", _cycle_device(loader), step, t.precision, t.channels_last, t.compile, desc,
                     backends=backends)  # fmt: skip
    live.warm_up(warmup, device)
    live.peak_mem_mb = mem.peak_mb()
    return live


def _start_reference(cfg: Config, split: Split, device: torch.device, warmup: int, workers: int) -> _LivePath:
    """Build the reference path and run its warm-up while tracking its peak memory."""
    from okd.engine.builder import build_method
    from okd.engine.seeding import seed_everything
    from okd.methods import METHODS

    mem = _PeakMemory(device)
    mem.start()
    seed_everything(cfg.run.seed)
    loader = reference_loader(split, cfg, device, METHODS.get(cfg.method_name).views, workers)
    method = build_method(cfg, _num_classes(cfg)).to(device)
    names, optimizers = build_optimizers(method, cfg)
    ref = ReferenceStep(method, names, optimizers)
    method.train()

    def step(x, y) -> None:
        ref.step(x, y, 0)

    # PyTorch's defaults (TF32 convolutions, fp32 matmuls) plus cudnn autotuning, as reference scripts set it
    backends = {"matmul_tf32": False, "cudnn_tf32": True, "cudnn_benchmark": True}
    live = _LivePath("reference", _cycle_reference(loader, device), step, "fp32", False, False, "", backends=backends)
    live.warm_up(max(warmup, 1), device)  # at least one step: it decides the per-component plan
    live.peak_mem_mb = mem.peak_mb()
    live.description = f"DataLoader(workers={workers}, per-sample torch transforms), fp32 eager, {ref.description}"
    return live


def build_optimizers(method: nn.Module, cfg: Config) -> tuple[list[str], list[torch.optim.Optimizer]]:
    """The group names and optimizers ``okd.engine.builder.build_optimization`` makes (schedules unused)."""
    from okd.engine.builder import build_optimization

    built = build_optimization(method, cfg)
    if isinstance(built, tuple):  # (names, optimizers, schedulers)
        return list(built[0]), list(built[1])
    return list(built.names), list(built.optimizers)


def cohort_macs(cfg: Config, split: Split, device: torch.device) -> MacCount:
    """:func:`count_step_macs` of the config's method on one batch of ``split`` (fp32, eager, contiguous)."""
    from okd.engine.builder import build_method
    from okd.methods import METHODS

    views = METHODS.get(cfg.method_name).views
    loader = okd_loader(split, dataclasses.replace(cfg, run=_contiguous_run(cfg)), device, views)
    x, y = next(iter(loader))
    method = build_method(cfg, _num_classes(cfg)).to(device)
    macs = count_step_macs(method, x, y, backward=True)  # the backward: one-time setup is not charged to a path
    del method, loader, x, y
    return macs


def _contiguous_run(cfg: Config):
    return dataclasses.replace(cfg.run, train=dataclasses.replace(cfg.run.train, channels_last=False))


def _num_classes(cfg: Config) -> int:
    return get_spec(cfg.run.data.dataset).num_classes


def default_workers(device: torch.device) -> int:
    """Reference DataLoader workers: the reference repos' 8 on a GPU machine (capped by the cores); on the CPU,
    the cores the training threads leave free (workers on busy cores slow the step more than they help)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cores)
    return max(0, min(8, cores - torch.get_num_threads()))


def window_plan(steps: int, windows: int, paths: int) -> list[tuple[int, int]]:
    """(path index, steps) of every timed window: ``steps`` split in ``windows`` windows per path, the paths
    interleaved in an ABBA order so both see the same drift in machine load."""
    windows = max(1, min(windows, steps))
    sizes = [steps // windows + (1 if i < steps % windows else 0) for i in range(windows)]
    plan = []
    for i, size in enumerate(sizes):
        order = list(range(paths)) if i % 2 == 0 else list(reversed(range(paths)))
        plan += [(p, size) for p in order]
    return plan


def bench(
    cfg: Config,
    *,
    config_name: str = "",
    steps: int = 20,
    warmup: int = 5,
    windows: int = 5,
    reference: bool = True,
    workers: int | None = None,
    synthetic: bool = False,
    check_syncs: bool = False,
    threads: int | None = None,
    csv_path: str | Path | None = "results/bench.csv",
    command: str | None = None,
) -> BenchReport:
    """Time the okd path (and, with ``reference``, the reference path) of ``cfg``; append rows to ``csv_path``.

    Both paths are built and warmed up one after the other (each one's peak memory is the growth over its own
    start), then their timed windows alternate; each path's images/s is the median over its windows.
    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards).
    """
    if steps <= 0 or warmup < 0 or windows <= 0:
        raise OKDError(f"--steps and --windows must be positive, --warmup >= 0 (got {steps}, {windows}, {warmup})")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(cfg, config_name, steps, warmup, windows, reference, workers, synthetic, check_syncs, csv_path,
                      command)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _bench(cfg, config_name, steps, warmup, windows, reference, workers, synthetic, check_syncs, csv_path, command):
    from okd.engine.builder import resolve_device

    if csv_path:
        check_csv(csv_path)  # fail before the run, not after it
    device = resolve_device(cfg.run.train.device)
    batch = cfg.run.data.batch_size
    workers = default_workers(device) if workers is None else workers
    split = load_split(cfg, min_images=batch * (warmup + steps + 2), synthetic=synthetic)
    macs = cohort_macs(cfg, split, device)
    report = BenchReport(config_name, cfg.method_name, cfg.run.model.name, batch, device, macs, split)
    paths = [_start_okd(cfg, split, device, warmup)]
    if reference:
        paths.append(_start_reference(cfg, split, device, warmup, workers))
    for index, size in window_plan(steps, windows, len(paths)):
        paths[index].timed_window(size, device)
    if check_syncs:
        paths[0].syncs = _count_syncs(paths[0], device)
    report.results = [p.result(steps) for p in paths]
    del paths  # stops the reference DataLoader's workers
    gc.collect()
    command = command or _default_command(config_name, steps, warmup, reference, csv_path)
    report.rows = [_row(report, r, command) for r in report.results]
    if csv_path:
        append_csv(report.rows, csv_path)
    return report


def _default_command(config_name: str, steps: int, warmup: int, reference: bool, csv_path) -> str:
    ref = "" if reference else " --no-reference"
    return f"okd bench {config_name} --steps {steps} --warmup {warmup}{ref} --csv {csv_path or ''}".strip()


def _row(report: BenchReport, r: PathResult, command: str) -> dict:
    d = report.device
    notes = [r.description, FLOPS_NOTE, f"MACs forward-only (no grad): {report.macs.no_grad}",
             "windows img/s: " + " ".join(f"{v:.1f}" for v in r.window_images_per_s)]  # fmt: skip
    if d.type == "cpu":
        notes.append("peak_mem: peak RSS growth over the path's build + warm-up (DataLoader workers excluded)")
    else:
        notes.append("peak_mem: max_memory_allocated growth over the path's build + warm-up")
    if r.syncs is not None:
        notes.append(f"sync calls in one step: {r.syncs}")
    if report.data.kind == "synthetic":
        notes.append(f"synthetic data: {report.data.reason}")
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hardware": hardware_line(d),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(d),
        "config": report.config,
        "method": report.method,
        "model": report.model,
        "path": r.path,
        "precision": r.precision,
        "channels_last": r.channels_last,
        "compile": r.compile,
        "batch": report.batch,
        "steps": r.steps,
        "images_per_s": round(r.images_per_s, 2),
        "s_per_epoch_50k": round(r.s_per_epoch, 3),
        "peak_mem_mb": round(r.peak_mem_mb, 1),
        "macs_per_image": report.macs.total,
        "tflops": round(report.tflops(r), 5),
        "command": command,
        "data": report.data.kind,
        "notes": "; ".join(notes),
    }


def check_csv(path: str | Path) -> bool:
    """Whether ``path`` already holds bench rows; raises if it holds a file with other columns."""
    path = Path(path)
    if not (path.is_file() and path.stat().st_size > 0):
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != CSV_COLUMNS:
        raise OKDError(f"{path} has columns {header}, not the bench columns; move it aside or pass --csv OTHER")
    return True


def append_csv(rows: list[dict], path: str | Path) -> None:
    """Append ``rows`` to ``path`` (header written when new; a file with other columns is refused)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = check_csv(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------- table
def format_table(report: BenchReport) -> str:
    """The side-by-side table (okd, reference, okd/reference)."""
    res = {r.path: r for r in report.results}
    okd, ref = res.get("okd"), res.get("reference")
    first = report.rows[0] if report.rows else {}
    head = [
        f"okd bench {report.config}: method={report.method} model={report.model} batch={report.batch} "
        f"data={report.data.kind}" + (f" ({report.data.reason})" if report.data.reason else ""),
        f"hardware: {first.get('hardware', hardware_line(report.device))} | device {report.device} | "
        f"torch {torch.__version__} | python {platform.python_version()} | commit {first.get('git_commit', '?')}",
        f"MACs per image: {report.macs.total / 1e6:.1f} M (forward-only {report.macs.no_grad / 1e6:.1f} M); "
        f"{FLOPS_NOTE}",
    ]

    def label(r: PathResult) -> str:
        if r.path == "reference":
            return "reference (fp32, eager)"
        flags = [r.precision] + (["channels_last"] if r.channels_last else []) + (["compile"] if r.compile else [])
        return f"okd ({', '.join(flags)})"

    metrics: list[tuple[str, Callable[[PathResult], float], str, bool]] = [
        ("images/s (median)", lambda r: r.images_per_s, "{:.1f}", True),
        ("s per 50k epoch", lambda r: r.s_per_epoch, "{:.2f}", False),
        ("peak memory (MB)", lambda r: r.peak_mem_mb, "{:.0f}", False),
        ("TFLOP/s", report.tflops, "{:.4f}", True),
    ]
    cols = [c for c in (okd, ref) if c is not None]
    header = ["", *[label(c) for c in cols]] + (["okd / reference"] if okd and ref else [])
    body = []
    for name, get, fmt, _ in metrics:
        line = [name, *[fmt.format(get(c)) for c in cols]]
        if okd and ref:
            a, b = get(okd), get(ref)
            line.append(f"{a / b:.2f}x" if b else "-")
        body.append(line)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [*head, "", fmt_line.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt_line.format(*r) for r in body]
    lines.append("")
    for c in cols:
        lines.append(f"{c.path}: {c.description}")
        lines.append(f"  window images/s: {' '.join(f'{v:.1f}' for v in c.window_images_per_s)}")
        if c.syncs is not None:
            lines.append(f"  synchronising CUDA calls in one step: {c.syncs}")
    if okd and ref:
        lines.append(f"speed-up okd/reference: {okd.images_per_s / ref.images_per_s:.2f}x (images/s, same run)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def cmd_bench(args: argparse.Namespace) -> int:
    """``okd bench CONFIG [key=value ...]``."""
    if not args.items or "=" in args.items[0]:
        raise OKDError("okd bench needs a config file first, e.g. okd bench configs/cifar100/ffsd_resnet32.yaml")
    config_path, overrides = args.items[0], args.items[1:]
    cfg = load_config(config_path, overrides)
    command = command_line(args)
    report = bench(
        cfg, config_name=config_path, steps=args.steps, warmup=args.warmup, windows=args.windows,
        reference=args.reference, workers=args.workers, synthetic=args.synthetic, check_syncs=args.check_syncs,
        threads=args.threads, csv_path=args.csv or None, command=command,
    )  # fmt: skip
    print(format_table(report))
    if args.csv:
        print(f"appended {len(report.rows)} row(s) to {args.csv}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The ``okd bench`` command that reproduces ``args`` (defaults spelled out)."""
    parts = ["okd", "bench", *args.items, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--windows", str(args.windows), "--reference" if args.reference else "--no-reference"]  # fmt: skip
    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--synthetic"] * args.synthetic + ["--check-syncs"] * args.check_syncs + ["--csv", args.csv]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None, prog: str = "python -m okd.bench") -> int:
    """``python -m okd.bench CONFIG [key=value ...] [options]``, the same as ``okd bench``.

    Also the lazy way to wire the CLI without importing torch at start-up: a ``bench`` subparser that takes
    ``argparse.REMAINDER`` and calls ``okd.bench.main(rest, prog="okd bench")``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return cmd_bench(args)
    except OKDError as exc:
        print(f"okd bench: error: {exc}", file=sys.stderr)
        return 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``okd bench``."""
    p.add_argument("items", nargs="+", metavar="CONFIG [key=value ...]", help="YAML config then overrides")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compile included (default 5)")
    p.add_argument("--windows", type=int, default=5, help="timed steps split in windows; median reported")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the reference path (default on)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: min(8, cores) on a GPU; on the CPU the cores "
                        "left free by the torch threads)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--synthetic", action="store_true", help="synthetic uint8 data even if the dataset is present")
    p.add_argument("--check-syncs", action="store_true", help="GPU: count synchronising calls in one okd step")
    p.add_argument("--csv", default="results/bench.csv", help="append rows here ('' to skip)")


def register_cli(subparsers) -> None:
    """Add ``okd bench`` to the CLI's subparsers (``args.func(args)`` runs it)."""
    p = subparsers.add_parser(
        "bench",
        help="time a config's training step against the standard-recipe reference path",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    sys.exit(main())
