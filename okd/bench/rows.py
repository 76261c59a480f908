"""CSV rows of a bench run: the columns, one row per path, and appending to a CSV file."""

from __future__ import annotations

import csv
import datetime
import platform
from pathlib import Path

import torch

from okd.bench.env import git_commit, hardware_line
from okd.bench.timing import BenchReport, PathResult
from okd.errors import OKDError

CSV_COLUMNS = [
    "timestamp", "git_commit", "hardware", "torch", "python", "device", "config", "method", "model", "path",
    "precision", "channels_last", "compile", "batch", "steps", "images_per_s", "s_per_epoch_50k", "peak_mem_mb",
    "macs_per_image", "tflops", "command", "data", "notes",
]  # fmt: skip
FLOPS_NOTE = "FLOPs = 2*MACs*3 (fwd+bwd) over Conv/ConvT/Linear MACs of one training_step forward"


def make_row(report: BenchReport, r: PathResult, command: str) -> dict:
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
    if not str(path).strip():
        raise OKDError("--csv needs a file path (got an empty one); leave --csv out to print the rows only")
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
