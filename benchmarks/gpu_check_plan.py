"""The plan of ``gpu_check``: section budgets, what each section runs, and the helpers the sections share."""

from __future__ import annotations

import csv
import datetime
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "speed", "accuracy", "smoke")
#: seconds per section on the GPU: speed alone, then accuracy in the background while smoke runs;
#: env 15 + speed 170 + max(accuracy 300, smoke 280) + start-up and summary ~20 = 505 s < 9 minutes
BUDGET_S = {"env": 15, "speed": 170, "accuracy": 300, "smoke": 280}
#: the same on the CPU with --dry-run: 10 + 40 + max(60, 100) + ~15 = 165 s < 3 minutes
DRY_BUDGET_S = {"env": 10, "speed": 40, "accuracy": 60, "smoke": 100}
ACCURACY_EPOCHS = 15
SPEED_METHODS = ("ffsd", "baseline", "dml", "one", "okddip")
SPEED_MODELS = ("resnet32", "wrn16_2")
ACCURACY_RUNS = [
    (m, net, p) for m in ("baseline", "dml", "ffsd") for net in ("resnet20", "resnet32") for p in ("bf16", "fp32")
]
#: what --dry-run does less of (CPU): no compiled speed items, 2 speed items, 2 accuracy runs of 2 short epochs,
#: bf16 smoke runs and exact-resume comparisons for RESUME_DRY only
DRY = {"speed_items": 2, "accuracy_runs": 2, "accuracy_epochs": 2}
RESUME_DRY = ("baseline", "ffsd")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def append_csv(path: Path, row: dict, columns: list[str]) -> None:
    """Append one row (header when new): a section stopped at its budget keeps every row written so far."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cifar10_root(data: str | None, work: Path, dry: bool) -> Path:
    """The official-layout CIFAR-10 root: ``data`` itself, or decoded there from ``cifar10-jpeg.npz`` with its
    ``make_cifar10.py``; for a dry run without data, a small synthetic official-layout folder under ``work``."""
    if data:
        root = Path(data)
        if (root / "cifar-10-batches-py").is_dir():
            return root
        if (root / "make_cifar10.py").is_file() and (root / "cifar10-jpeg.npz").is_file():
            subprocess.run([sys.executable, str(root / "make_cifar10.py"), str(root)], check=True)
            return root
        raise SystemExit(
            f"--data {data}: no cifar-10-batches-py folder there, nor cifar10-jpeg.npz + make_cifar10.py to make one"
        )
    if not dry:
        raise SystemExit("--data CIFAR10_DIR is needed (the accuracy and smoke sections train on CIFAR-10)")
    return synthetic_cifar10(work / "synthetic-cifar10")


def synthetic_cifar10(root: Path, per_file: int = 64) -> Path:
    """Random images in the official python-pickle layout (5 training files, a test file, batches.meta)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    if (folder / "test_batch").exists():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_file).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


class Deadline:
    """The end of a section's budget (a little before the driver's hard stop)."""

    def __init__(self, seconds: float, margin: float = 5.0) -> None:
        self.end = time.monotonic() + seconds - margin

    def left(self) -> float:
        return self.end - time.monotonic()


def speed_items(dry: bool) -> list[dict]:
    """The bench items in priority order: what matters most comes first, in case the budget runs out."""
    combos = [(m, n) for n in SPEED_MODELS for m in SPEED_METHODS]
    first = [("ffsd", "resnet32"), ("baseline", "resnet32")]
    rest = [c for c in combos if c not in first]
    items = []
    for group in (first, rest):
        for precision in ("bf16", "fp32"):
            items += [{"method": m, "model": n, "precision": precision, "compile": False} for m, n in group]
        items += [{"method": m, "model": n, "precision": "bf16", "compile": True} for m, n in group]
    items += [{"method": m, "model": n, "precision": "fp32", "compile": True} for m, n in first + rest]
    return items[: DRY["speed_items"]] if dry else items


ACCURACY_COLUMNS = [
    "method",
    "model",
    "precision",
    "epochs",
    "epochs_done",
    "status",
    "seconds",
    "head",
    "final_top1",
    "best_top1",
    "best_epoch",
    "run_dir",
]


SMOKE_COLUMNS = [
    "method",
    "precision",
    "device",
    "status",
    "seconds",
    "steps_per_epoch",
    "heads",
    "top1",
    "resumed_to_epoch",
    "resume_exact",
    "error",
]


#: the file(s) each section must leave under OUT
OUTPUTS = {"env": ["env.json"], "speed": ["speed.csv", "speed_items.json"], "accuracy": ["accuracy.csv"],
           "smoke": ["smoke.csv"], "summary": ["summary.md", "summary.json", "gpu_check.log"]}  # fmt: skip


def missing_outputs(out: Path) -> list[str]:
    """The expected result files that are absent or empty under ``out`` (``--verify``)."""
    return [f for files in OUTPUTS.values() for f in files if not (out / f).is_file() or (out / f).stat().st_size == 0]


def failed_smoke(out: Path) -> list[str]:
    """``method precision`` of every smoke row that ended in an error (``--verify``): a method that cannot train one
    step of its own settings."""
    path = out / "smoke.csv"
    rows = read_csv(path) if path.is_file() else []
    return [f"{r['method']} {r['precision']}" for r in rows if r.get("status") == "error"]
