"""One epoch of training steps: the step loop, its progress bar with the run's ETA, and the epoch's mean losses
reduced over the processes (:func:`okd.engine.trainer.train` calls it once per epoch)."""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor

from okd.engine.distributed import DistContext, all_reduce_sum
from okd.engine.heartbeat import StepReport
from okd.engine.run_log import format_duration, live_eta
from okd.engine.step import StepRunner
from okd.errors import ConfigError, NonFiniteError


def interactive(progress: str) -> bool:
    """Whether ``train.progress`` asks for progress bars: ``bar``, or ``auto`` on a terminal."""
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


def heartbeat(progress: str) -> bool:
    """Whether step lines stand in for the bar: ``log``, or ``auto`` off a terminal (output to a file)."""
    return progress != "none" and not interactive(progress)


def steps_per_epoch(loader, train_cfg) -> int:
    """The optimizer steps of one epoch: the loader's length, capped by ``train.max_steps_per_epoch``."""
    n = len(loader)
    return n if train_cfg.max_steps_per_epoch is None else min(n, train_cfg.max_steps_per_epoch)


def train_epoch(
    runner: StepRunner,
    loader,
    epoch: int,
    train_cfg,
    dist: DistContext,
    paces: list[float] = (),
    report: StepReport | None = None,
) -> dict[str, float]:
    """One epoch of training steps; the bar (when interactive) shows "epoch k/N" and the run's ETA from the
    step time and ``paces``, the seconds of the epochs timed before; ``report`` (the main process's heartbeat
    and per-step tracker scalars) is called after every step."""
    runner.method.train()
    loader.set_epoch(epoch)
    sums: dict[str, Tensor] = {}
    nonfinite = torch.zeros((), device=runner.device)  # steps whose loss is NaN/inf, read with the sums
    images_seen = 0
    max_steps = train_cfg.max_steps_per_epoch
    batches, bar = loader, None
    n_steps = steps_per_epoch(loader, train_cfg)
    if interactive(train_cfg.progress) and dist.is_main:
        from tqdm import tqdm

        desc = f"epoch {epoch + 1}/{train_cfg.epochs}"
        batches = bar = tqdm(loader, total=n_steps, desc=desc, leave=False, file=sys.stderr)
    start = time.perf_counter()
    if report is not None and not report.active:
        report = None
    if report is not None:
        report.start_epoch(epoch, n_steps, paces)
    for step, (images, labels) in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        losses, total = runner.step(images, labels, epoch)
        n = labels.shape[0]
        images_seen += n
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * n
        sums["loss"] = sums.get("loss", 0.0) + total.detach().float() * n
        if bar is not None:
            step_s = (time.perf_counter() - start) / (step + 1)
            eta = live_eta(paces, train_cfg.epochs - epoch - 1, step_s, n_steps - step - 1, n_steps)
            bar.set_postfix_str(f"run ETA {format_duration(eta)}", refresh=False)
        nonfinite = nonfinite + (~torch.isfinite(total.detach())).float()
        if report is not None:
            report.after_step(step, images_seen, total)
    if images_seen == 0:
        raise ConfigError("the training split yielded no batch; lower data.batch_size or set data.drop_last=false")
    keys = list(sums)
    count = torch.tensor(float(images_seen), device=runner.device)  # on the device: stack never mixes devices
    packed = torch.stack([sums[k] for k in keys] + [nonfinite, count]).to(torch.float64)
    packed = all_reduce_sum(packed, dist).tolist()
    sync(runner.device)
    seconds = time.perf_counter() - start
    seen = packed[-1]
    if packed[-2]:
        raise NonFiniteError(
            f"epoch {epoch + 1}: the training loss was not finite (NaN or inf) in {int(packed[-2])} step(s)"
        )
    row: dict[str, float] = {"epoch": epoch + 1}
    row.update({f"train/{k}": packed[i] / seen for i, k in enumerate(keys)})
    row["time/epoch_s"] = seconds
    row["time/images_per_s"] = seen / max(seconds, 1e-9)
    return row


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a time taken after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
