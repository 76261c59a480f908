"""Torch's CPU thread count against the cores actually free: oversubscribed threads slow a busy CPU several-fold."""

from __future__ import annotations

import os

import torch

from okd.log import log, setup_logging

_warned = False


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


def free_cores() -> int:
    """Usable cores minus the 1-minute load average (rounded), at least 1."""
    return max(1, usable_cores() - round(load_average()))


def thread_warning(threads: int | None = None) -> str | None:
    """A warning when torch's intra-op threads exceed the free cores; None when they fit."""
    threads = torch.get_num_threads() if threads is None else threads
    free = free_cores()
    if threads <= free:
        return None
    return (
        f"torch uses {threads} threads but only {free} of {usable_cores()} cores are free (load average "
        f"{load_average():.1f}); oversubscribed threads can make every step several times slower. "
        f"Set OMP_NUM_THREADS={free} (or torch.set_num_threads({free}))."
    )


def warn_threads_once() -> None:
    """Log :func:`thread_warning` the first time it applies in this process."""
    global _warned
    if _warned:
        return
    message = thread_warning()
    if message is not None:
        _warned = True
        setup_logging()
        log.warning(message)
