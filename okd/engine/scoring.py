"""Score a run folder or checkpoint on the test split (``okd test``)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from okd.config import build_config, parse_overrides
from okd.data import build_loaders
from okd.engine.builder import build_method, resolve_device
from okd.engine.checkpoint import load_checkpoint, load_state_checked
from okd.engine.evaluate import evaluate
from okd.engine.run_store import current_file
from okd.errors import CheckpointError
from okd.models.spec import check_stored_config


def resolve_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A run folder resolves to its ``last.pt`` or ``best.pt`` (put in line with last.pt first, see
    :func:`~okd.engine.run_store.current_file`); a file is used as given."""
    path = Path(path)
    if path.is_dir():
        path = current_file(path, which)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<name>) or a .pt file")
    return path


def score_checkpoint(path: str | Path, which: str = "last", overrides: list[str] = ()) -> tuple[dict, dict]:
    """Evaluate every head of a run checkpoint (or the one network of a ``deploy.pt``) on the test split.

    Returns (metrics, info): info holds the checkpoint's path, epoch, note and ``deploy_head``, the head
    that scores the deployed network.
    """
    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    from okd.report.export import DEPLOY_FORMAT

    if ckpt.get("format") == DEPLOY_FORMAT:
        return _score_deploy_file(ckpt_path, ckpt, overrides)
    if "config" not in ckpt or "method" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is neither a run checkpoint (last.pt, best.pt) nor a deploy.pt")
    check_stored_config(ckpt["config"])
    raw = OmegaConf.merge(OmegaConf.create(ckpt["config"]), parse_overrides(list(overrides)))
    cfg = build_config(raw)
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.train.device)
    _, test_loader, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, device, views=1)
    method = build_method(cfg, num_classes).to(device)
    load_state_checked(method, ckpt["method"], str(ckpt_path))
    metrics = evaluate(method, test_loader)
    metrics.update(method.derived_metrics(metrics))
    head = method.deploy_head or next(iter(metrics)).split("/")[0]
    return metrics, {"path": str(ckpt_path), "epoch": ckpt.get("epoch"), "note": ckpt.get("note"), "deploy_head": head}


class _DeployedNetwork(nn.Module):
    """The single network of a deploy.pt, scored under the name of the head it was in training."""

    def __init__(self, net: nn.Module, head: str) -> None:
        super().__init__()
        self.net, self.head = net, head

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {self.head: self.net(images)}

    def oracle_groups(self) -> dict[str, list[str]]:
        return {}


def _score_deploy_file(ckpt_path: Path, ckpt: dict, overrides: list[str]) -> tuple[dict, dict]:
    """A deploy.pt scored with the data settings of the run's ``config.yaml`` beside it."""
    from okd.report.export import load_deployable

    config_file = ckpt_path.parent / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(
            f"{ckpt_path} is a deploy.pt without the run's config.yaml beside it, so its test split is unknown; "
            "score the run folder instead, or copy config.yaml next to it"
        )
    stored = OmegaConf.load(config_file)
    check_stored_config(OmegaConf.to_container(stored))
    raw = OmegaConf.merge(stored, parse_overrides(list(overrides)))
    cfg = build_config(raw)
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.train.device)
    _, test_loader, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, device, views=1)
    head = _deployed_head_name(cfg, num_classes, test_loader)
    net = load_deployable(ckpt_path, check=False).net.to(device)
    metrics = evaluate(_DeployedNetwork(net, head), test_loader)
    return metrics, {"path": str(ckpt_path), "epoch": ckpt.get("epoch"), "note": None, "deploy_head": head}


def _deployed_head_name(cfg, num_classes: int, loader) -> str:
    """The head a method's deployable network is scored as in training (the class says, or an instance does:
    built without its weights; the first head where the method names none, as the trainer does)."""
    from okd.methods import METHODS

    head = getattr(METHODS.get(cfg.method_name), "deploy_head", None)
    if head:
        return head
    method = build_method(cfg, num_classes).eval()
    images, _ = next(iter(loader))
    return method.deploy_head or next(iter(method.eval_outputs(images[:1].cpu())))
