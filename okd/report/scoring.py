"""Score a run folder or checkpoint on the test split (``okd test``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from okd.config import parse_overrides
from okd.data import build_loaders
from okd.engine.builder import resolve_device
from okd.engine.evaluate import evaluate
from okd.engine.step import autocast
from okd.errors import CheckpointError, ConfigError
from okd.io import load_checkpoint, load_state_checked
from okd.methods import METHODS
from okd.methods.build import build_config, build_method
from okd.models.deploy_file import DEPLOY_FORMAT, build_network, read_deploy
from okd.models.members import is_mixed, member_entries
from okd.models.spec import check_stored_config
from okd.runs.reader import Run

PRECISIONS = ("run", "fp32")


def score_checkpoint(
    path: str | Path, which: str = "last", overrides: list[str] = (), precision: str = "run"
) -> tuple[dict, dict]:
    """Evaluate every head of a run's checkpoint (or the one network of a ``deploy.pt``) on the test split.

    A run folder (or its last.pt/best.pt/deploy.pt) is read through :class:`~okd.runs.reader.Run`: as last.pt
    commits it. ``precision``: ``run`` evaluates under the run's ``train.precision`` (bf16/fp16 autocast), as
    training scores its epochs, so the figures agree with the run's log and metrics.csv; ``fp32`` in full
    precision. Returns (metrics, info): info holds the source, epoch, note, ``deploy_head`` (the head that
    scores the deployed network), ``precision`` (what was used; ``run_precision``: the run's) and ``run`` (the
    :class:`Run`, or None for a file outside a run folder).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    path = Path(path)
    run = _run_of(path)
    if run is not None and (path.is_dir() or path.stem in ("last", "best")):
        record, source = run.checkpoint(path.stem if path.is_file() else which)
    elif run is not None:  # the run's deploy.pt: the committed epoch's deploy record
        return _score_deploy_record(*run.deploy_record(), run.dir, overrides, run, precision)
    else:
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} does not exist; give a run folder (runs/<name>) or a .pt file")
        if path.suffix == ".safetensors":  # okd export --format safetensors: a deploy file without pickle
            return _score_deploy_record(read_deploy(path), str(path), path.parent, overrides, None)
        record, source = load_checkpoint(path), str(path)
        if record.get("format") == DEPLOY_FORMAT:
            return _score_deploy_record(read_deploy(path), source, path.parent, overrides, None, precision)
    if "config" not in record or "method" not in record:
        raise CheckpointError(f"{source} is neither a run checkpoint (last.pt, best.pt) nor a deploy.pt")
    check_stored_config(record["config"])
    cfg = build_config(OmegaConf.merge(OmegaConf.create(record["config"]), parse_overrides(list(overrides))))
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.train.device)
    _, test_loader, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, device, views=1)
    method = build_method(cfg, num_classes).to(device)
    load_state_checked(method, record["method"], source)
    with _precision(cfg, device, precision):
        metrics = evaluate(method, test_loader)
        metrics.update(method.derived_metrics(metrics))
    head = method.deploy_head or next(iter(metrics)).split("/")[0]
    info = {"path": source, "epoch": record.get("epoch"), "note": record.get("note"), "deploy_head": head, "run": run}
    info.update(_precision_info(cfg, precision))
    info["labels"] = method.head_networks()
    return metrics, info


def _precision(cfg, device: torch.device, precision: str):
    """The run's autocast (``run``), as the trainer evaluates each epoch; none for ``fp32``."""
    return autocast(cfg.run.train, device) if precision == "run" else contextlib.nullcontext()


def _precision_info(cfg, precision: str) -> dict[str, str]:
    used = cfg.run.train.precision if precision == "run" else "fp32"
    return {"precision": used, "run_precision": cfg.run.train.precision}


def _run_of(path: Path) -> Run | None:
    """The run a path names: a folder (which must hold a committed epoch), or a last.pt/best.pt/deploy.pt
    inside a folder that has one; None for a file outside a run folder."""
    if path.is_dir():
        return Run(path)
    if path.name in ("last.pt", "best.pt", "deploy.pt") and (path.parent / "last.pt").exists():
        return Run(path.parent)
    if path.name in ("best.pt", "deploy.pt") and (path.parent / "config.yaml").is_file():
        return Run(path.parent)  # refuses: results of a folder with no committed epoch
    return None


class _DeployedNetwork(nn.Module):
    """The single network of a deploy.pt, scored under the name of the head it was in training."""

    def __init__(self, net: nn.Module, head: str) -> None:
        super().__init__()
        self.net, self.head = net, head

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {self.head: self.net(images)}

    def oracle_groups(self) -> dict[str, list[str]]:
        return {}


def _score_deploy_record(
    record: dict, source: str, folder: Path, overrides: list[str], run: Run | None, precision: str = "run"
) -> tuple[dict, dict]:
    """A deploy record scored with the data settings of its run (the run's config, else ``config.yaml``
    beside a standalone deploy.pt or export, or in the run folder above an ``export/`` folder)."""
    beside = [folder / "config.yaml"] + ([folder.parent / "config.yaml"] if folder.name == "export" else [])
    found = next((p for p in beside if p.is_file()), None)
    if run is not None:
        stored = OmegaConf.create(run.config_dict)
    elif found is not None:  # beside the file, or the run folder above its export/ folder
        stored = OmegaConf.load(found)
    else:
        raise CheckpointError(
            f"{source} is a deploy file without the run's config.yaml beside it, so its test split is unknown; "
            "score the run folder instead, or copy the run's config.yaml next to it"
        )
    check_stored_config(OmegaConf.to_container(stored))
    cfg = build_config(OmegaConf.merge(stored, parse_overrides(list(overrides))))
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.train.device)
    _, test_loader, num_classes, _ = build_loaders(cfg.run.data, cfg.run.seed, device, views=1)
    head = record.get("head") or _deployed_head_name(cfg, num_classes, test_loader)
    net = build_network(record, source).eval().to(device)
    with _precision(cfg, device, precision):
        metrics = evaluate(_DeployedNetwork(net, head), test_loader)
    mixed = is_mixed(member_entries(cfg.run.model.members))  # the network of a member of a mixed cohort
    labels = {head: record["model"]} if mixed and record.get("head") else {}
    info = {"path": source, "epoch": record.get("epoch"), "note": None, "deploy_head": head, "run": run}
    return metrics, {**info, "labels": labels, **_precision_info(cfg, precision)}


def _deployed_head_name(cfg, num_classes: int, loader) -> str:
    """The head a method's deployable network is scored as in training (the class says, or an instance does:
    built without its weights; the first head where the method names none, as the trainer does)."""
    head = getattr(METHODS.get(cfg.method_name), "deploy_head", None)
    if head:
        return head
    method = build_method(cfg, num_classes).eval()
    images, _ = next(iter(loader))
    return method.deploy_head or next(iter(method.eval_outputs(images[:1].cpu())))
