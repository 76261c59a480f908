"""The environment a bench row records: hardware line, git commit, device sync and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch


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
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
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
