"""Timed windows in ABBA order, each path's live state and figures, and the report of one run."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from okd.bench.data import Split
from okd.bench.env import sync_device
from okd.bench.macs import MacCount

EPOCH_IMAGES = 50_000
FLOPS_PER_MAC = 2 * 3  # multiply + add, forward + backward (backward ~ 2x forward)


@dataclass
class PathResult:
    """One path's figures."""

    path: str  # okd | reference | okd-eager (the uncompiled okd step, with --also-eager)
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
class LivePath:
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
        sync_device(device)

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
