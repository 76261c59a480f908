"""Score a run folder or checkpoint on the test split (``okd test``)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from okd.config import build_config, parse_overrides
from okd.data import build_loaders
from okd.engine.builder import build_method, resolve_device
from okd.engine.checkpoint import load_checkpoint, load_state_checked
from okd.engine.evaluate import evaluate
from okd.errors import CheckpointError


def resolve_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A run folder resolves to its ``last.pt`` or ``best.pt``; a file is used as given."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{which}.pt"
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<name>) or a .pt file")
    return path


def score_checkpoint(path: str | Path, which: str = "last", overrides: list[str] = ()) -> tuple[dict, dict]:
    """Evaluate every head of a run checkpoint on the test split. Returns (metrics, checkpoint info)."""
    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    if "config" not in ckpt or "method" not in ckpt:
        raise CheckpointError(
            f"{ckpt_path} is not a run checkpoint (no config/method state); "
            "deploy.pt files hold a single network: use `okd export`/`okd predict` for those"
        )
    raw = OmegaConf.merge(OmegaConf.create(ckpt["config"]), parse_overrides(list(overrides)))
    cfg = build_config(raw)
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.train.device)
    _, test_loader, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, device, views=1)
    method = build_method(cfg, num_classes).to(device)
    load_state_checked(method, ckpt["method"], str(ckpt_path))
    metrics = evaluate(method, test_loader)
    metrics.update(method.derived_metrics(metrics))
    return metrics, {"path": str(ckpt_path), "epoch": ckpt.get("epoch"), "note": ckpt.get("note")}
