"""Hand-made run folders for the recipe-aware report tests (``import recipe_fixtures``): a config resolved from
a packaged config (so it names its recipe), a history written by hand, and the last.pt records a reader needs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from okd.methods.build import load_config
from okd.runs.metrics import metrics_csv_text
from okd.runs.records import CHECKPOINT_FORMAT, RUN_KEYS


def fake_run(
    folder: Path,
    config: str,
    overrides: list[str],
    rows: list[dict[str, float]],
    world_size: int = 1,
    device: str | None = "cpu",
) -> Path:
    """A committed run folder of ``config`` with ``overrides`` whose history is ``rows`` (epoch numbers added)."""
    cfg = load_config(config, [*overrides, f"train.epochs={len(rows)}", f"name={folder.name}"]).to_dict()
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    history = [{"epoch": i, **row} for i, row in enumerate(rows, start=1)]
    (folder / "metrics.csv").write_text(metrics_csv_text(history))
    last = {"format": CHECKPOINT_FORMAT, "config": cfg, "epoch": len(history), "history": history}
    last |= {k: {} for k in RUN_KEYS if k not in last} | {"best": {"epoch": 0}, "world_size": world_size}
    if device is not None:
        last["device"] = device
    torch.save(last, folder / "last.pt")
    return folder


def timed(row: dict[str, float], images_per_s: float = 100.0, epoch_s: float = 36.0, eval_s: float = 0.0) -> dict:
    """``row`` with the timing columns the trainer writes."""
    return {**row, "time/images_per_s": images_per_s, "time/epoch_s": epoch_s, "time/eval_s": eval_s}
