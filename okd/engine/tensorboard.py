"""Optional TensorBoard logging of every metric of a run (the ``tensorboard`` extra).

``TensorBoardLogger(run_dir).log_row(row, step)`` writes each numeric entry of a metrics row (the same keys
as ``metrics.csv``: ``train/<term>``, ``test/<head>/top1``, ``lr/<group>``, ``time/...``) as a scalar to
``run_dir/tensorboard/``; ``epoch`` itself is the step, not a scalar.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

from okd.errors import OKDError


class TensorBoardLogger:
    """Scalars of every metric row into ``<run_dir>/tensorboard`` (view with ``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the tensorboard package is absent
            raise OKDError(
                'TensorBoard logging needs the tensorboard package, an optional extra: pip install "okd[tensorboard]"'
            ) from None
        self.log_dir = Path(run_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_row(self, row: dict, step: int) -> None:
        """Write every finite numeric value of ``row`` (except ``epoch``) at ``step``, then flush."""
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
