"""TensorBoard as a tracker (the ``tensorboard`` extra): every metric of a run as scalars in ``<run>/tensorboard``.

``TensorBoardLogger(run_dir)`` takes the trackers' interface (:class:`okd.engine.trackers.Tracker`):
``log_metrics(metrics, step, axis)`` writes each value (``train/<term>``, ``test/<head>/top1``, ``lr/<group>``,
``time/...``; per-step scalars under ``step/...``) at ``step``; ``log_params`` the resolved config as text.
``log_row(row, epoch)`` is an epoch's metrics row (``epoch`` itself is the step, not a scalar).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from okd.errors import OKDError


def finite_scalars(row: dict) -> dict[str, float]:
    """The finite real numbers of a metrics row, ``epoch`` left out (it is the step)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))
    }


class TensorBoardLogger:
    """Scalars of every metric into ``<run_dir>/tensorboard`` (view with ``tensorboard --logdir runs``)."""

    name = "tensorboard"

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the tensorboard package is absent
            raise OKDError(
                'TensorBoard logging needs the tensorboard package, an optional extra: pip install "okd[tensorboard]"'
            ) from None
        self.log_dir = Path(run_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.run_id = None  # nothing to continue on resume: the event files stay in the run folder

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))  # indented: markdown code
        self.writer.add_text("config", text)

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str = "epoch") -> None:
        """Write every finite value of ``metrics`` at ``step``, then flush."""
        for key, value in finite_scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=int(step))
        self.writer.flush()

    def log_row(self, row: dict, step: int) -> None:
        """Write every finite numeric value of ``row`` (except ``epoch``) at ``step``, then flush."""
        self.log_metrics(row, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
