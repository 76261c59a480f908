"""What a run says between epoch lines: a step line every ``train.log_every_steps`` steps or
``train.log_every_seconds`` seconds when its output is not a terminal (a file, a job log), where no progress bar
shows; and the trackers' per-step scalars every ``train.track_every_steps`` steps. A step's loss is read from the
device only when one of them is due (one host sync there, none on the other steps)."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from okd.engine.run_log import format_duration, live_eta
from okd.log import log


class StepReport:
    """Called after every training step of the main process (:func:`okd.engine.epoch.train_epoch`).

    ``heartbeat``: print step lines (off a terminal, ``train.progress`` not ``none``); ``trackers``: a
    :class:`~okd.engine.trackers.Trackers` (or None); ``learning_rates()``: the optimizers' current rates."""

    def __init__(
        self,
        train_cfg,
        heartbeat: bool,
        trackers=None,
        learning_rates: Callable[[], dict[str, float]] = dict,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.every_steps = train_cfg.log_every_steps if heartbeat else 0
        self.every_s = train_cfg.log_every_seconds if heartbeat else 0.0
        self.track_every = train_cfg.track_every_steps if trackers else 0
        self.epochs, self.trackers, self.learning_rates, self.clock = train_cfg.epochs, trackers, learning_rates, clock
        self.epoch = self.n_steps = 0
        self.paces: list[float] = []
        self.start = self.last_line = 0.0

    @property
    def active(self) -> bool:
        return bool(self.every_steps or self.every_s or self.track_every)

    def start_epoch(self, epoch: int, n_steps: int, paces: list[float]) -> None:
        """``epoch``: 0-based; ``paces``: the seconds of the epochs timed before (for the run's ETA)."""
        self.epoch, self.n_steps, self.paces = epoch, n_steps, list(paces)
        self.start = self.last_line = self.clock()

    def after_step(self, step: int, images_seen: int, total: Tensor) -> None:
        """After 0-based ``step`` of the epoch, ``images_seen`` images into it; ``total``: the step's loss."""
        done = step + 1
        now = self.clock()
        line_due = done < self.n_steps and (
            (self.every_steps and done % self.every_steps == 0)
            or (self.every_s and now - self.last_line >= self.every_s)
        )
        track_due = self.track_every and done % self.track_every == 0
        if not (line_due or track_due):
            return
        loss = float(total.detach())
        if track_due:
            global_step = self.epoch * self.n_steps + done
            self.trackers.log_step(
                {"step/loss": loss, **{f"step/{k}": v for k, v in self.learning_rates().items()}}, global_step
            )
        if line_due:
            self.last_line = now
            log.info(self.line(done, images_seen, loss, now - self.start))

    def line(self, done: int, images_seen: int, loss: float, seconds: float) -> str:
        """``epoch 3/10 step 120/391: loss=2.3012, 410 img/s, run ETA 1h02m`` (the step's own loss)."""
        step_s = seconds / done
        eta = live_eta(self.paces, self.epochs - self.epoch - 1, step_s, self.n_steps - done, self.n_steps)
        speed = images_seen / max(seconds, 1e-9)
        return (
            f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.n_steps}: loss={loss:.4f}, "
            f"{speed:.0f} img/s, run ETA {format_duration(eta)}"
        )
