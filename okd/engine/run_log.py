"""The run folder's human-readable history: metrics.csv (one row per epoch) and per-epoch log lines."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

from okd.engine.checkpoint import atomic_write_text

log = logging.getLogger("okd")


def write_metrics_csv(history: list[dict[str, float]], path: str | Path) -> None:
    """Rewrite metrics.csv atomically from the full history (columns in first-seen order)."""
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    atomic_write_text(buf.getvalue(), path)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else format(value, ".10g")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def epoch_line(row: dict[str, float], heads: list[str]) -> str:
    accs = " ".join(f"{h}={row[f'test/{h}/top1']:.2f}" for h in heads if f"test/{h}/top1" in row)
    return (
        f"epoch {int(row['epoch'])}: loss={row.get('train/loss', float('nan')):.4f} "
        f"top1 [{accs}] {row['time/epoch_s']:.1f}s {row['time/images_per_s']:.0f} img/s"
    )
