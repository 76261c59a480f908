"""The record formats of a run folder: what last.pt, best.pt and deploy.pt hold, and the checks before a commit."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from okd.errors import CheckpointError, UnsafeCheckpointError
from okd.io import load_checkpoint
from okd.methods.cohort import deployed_spec
from okd.models.deploy_file import DEPLOY_FORMAT
from okd.models.spec import deploy_fields

CHECKPOINT_FORMAT = "okd-run-v1"
BEST_NOTE = (
    "best.pt holds the epoch with the highest test top-1 of the deployable head: it is selected on the "
    "test split (as the reference papers report), so its accuracy is optimistic; last.pt is the honest number"
)
#: what every last.pt holds
RUN_KEYS = ("config", "epoch", "method", "optimizers", "schedulers", "history", "best", "rng_per_rank")


def last_record(cfg, runner, plan, epoch: int, history: list[dict], best: dict, rngs: list) -> dict:
    """last.pt: everything a resume needs, and (``epoch``, ``best``) what the other files hold; for a cohort of
    different networks also ``head_networks`` (each per-network head's network, for the readers' labels)."""
    heads = runner.method.head_networks()
    return {
        **({"head_networks": heads} if heads else {}),
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "num_classes": int(runner.method.ctx.num_classes),
        "method": runner.method.state_dict(),
        **plan.state_dict(),
        "runner": runner.state_dict(),
        "rng_per_rank": rngs,
        "world_size": len(rngs),
        "device": device_label(runner.device),  # what the run's timings were measured on (okd compare)
        "history": history,
        "best": best,
    }


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda`` with the GPU's name (``cuda (NVIDIA H100 80GB HBM3)``)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def best_record(last: dict) -> dict:
    """best.pt: the last.pt record of the best epoch, marked as selected on the test split among the epochs that
    were scored (``scored_epochs``: every epoch, or every ``train.eval_every``-th and the last)."""
    scored = scored_epochs(last["history"])
    note = BEST_NOTE
    if len(scored) < len(last["history"]):
        note += f"; chosen among the scored epochs {', '.join(map(str, scored))} (train.eval_every)"
    return {
        "format": CHECKPOINT_FORMAT + "-best",
        "note": note,
        "selected_on": "test",
        "scored_epochs": scored,
        **last,
    }


def scored_epochs(history: list[dict]) -> list[int]:
    """The epochs of a run's history that were evaluated on the test split (their rows hold ``test/`` keys)."""
    return [int(row["epoch"]) for row in history if any(k.startswith("test/") for k in row)]


def deploy_record(cfg, method, epoch: int, rebuild: dict | None = None) -> dict:
    """deploy.pt: the method's deployable network alone, with what rebuilds and feeds it (``rebuild``, else
    :func:`okd.models.spec.deploy_fields` from the config: the model spec, a folder dataset's preprocessing).

    A cohort given by ``model.members`` (or KDCL's ``method.models``) deploys one member: ``model`` and
    ``model_spec`` describe that member, and ``head`` names the head that scored it."""
    deploy = method.deployable()
    fields = dict(rebuild if rebuild is not None else deploy_fields(cfg))
    model, member = cfg.run.model.name, deployed_spec(cfg, method)
    if member is not None:
        model, fields["model_spec"] = member["name"], member
        if cfg.run.model.members is not None and method.deploy_head:
            fields["head"] = method.deploy_head
    return {
        "format": DEPLOY_FORMAT,
        "model": model,
        "method": cfg.method_name,
        "num_classes": int(method.ctx.num_classes),
        "epoch": epoch,
        **fields,
        "state_dict": {k: v.detach().cpu() for k, v in deploy.state_dict().items()},
    }


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``state`` holding a NaN or inf (one host sync), else None."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return None
    flags = torch.stack([torch.isfinite(state[k]).all() for k in names]).cpu()
    bad = (~flags).nonzero()
    return names[int(bad[0])] if len(bad) else None


def nonfinite_values(row: dict[str, float]) -> list[str]:
    return [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]


def best_lost_message(run_dir: Path, last: dict) -> str:
    held = epoch_of(run_dir / "best.pt")
    return (
        f"best.pt holds epoch {held if held is not None else 'none'}, but last.pt says the best epoch is "
        f"{last['best']['epoch']}, whose weights are no longer on disk (best.pt was not saved with it); "
        "use last.pt (--checkpoint last), or train on to a new best epoch"
    )


def epoch_of(path: Path) -> int | None:
    """The ``epoch`` a checkpoint file holds; None when it is missing, truncated or has none (a file holding code
    is refused, never read over)."""
    if not path.is_file():
        return None
    try:
        epoch = load_checkpoint(path, mmap=True).get("epoch")
    except UnsafeCheckpointError:
        raise  # a file holding code is refused, not repaired over
    except CheckpointError:
        return None  # missing or truncated: rebuilt from last.pt where it can be
    return int(epoch) if epoch is not None else None
