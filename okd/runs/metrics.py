"""metrics.csv: one row per epoch (every loss term, every head's test top-1/top-5, learning rates, timings).

Written by the run store from last.pt's history (so it never holds an epoch last.pt does not commit); read by
:class:`~okd.runs.reader.Run`, which answers only up to the committed epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path


def metrics_csv_text(history: list[dict[str, float]]) -> str:
    """metrics.csv of the full history (columns in first-seen order)."""
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
    return buf.getvalue()


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else format(value, ".10g")


def best_in_history(history: list[dict[str, float]], head: str) -> tuple[float, int] | None:
    """The highest ``test/<head>/top1`` of a run's history and its epoch (the first such epoch)."""
    key = f"test/{head}/top1"
    scored = [(row[key], int(row["epoch"])) for row in history if key in row]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return top, next(e for s, e in scored if s == top)
