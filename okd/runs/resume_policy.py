"""What may change when a run is resumed, and the record of every resume (``resume_history.jsonl``).

A resumed run continues the state in ``last.pt``: its weights, optimizer moments, schedulers and random
streams were produced by the recipe saved with it. A config key given on resume (``okd train --resume RUN
key=value``, or a config file given with ``--resume``) is therefore one of three kinds:

- **may change** (:data:`MAY_CHANGE`): where and how the run executes, not what it computes: ``train.epochs``
  (at least the epochs already trained), ``train.progress``, ``train.device``, ``train.tensorboard``, the
  evaluation interval ``train.eval_every`` (evaluation never touches the training state: the weights a run
  reaches do not depend on it; the epochs already scored stay as they were), the heartbeat
  (``train.log_every_steps``/``log_every_seconds``), the trackers (``train.mlflow``, ``mlflow_uri``, ``wandb``,
  ``tracker_project``, ``track_every_steps``),
  ``train.deterministic``, ``train.compile``/``compile_mode``, ``train.tf32``, ``train.cudnn_benchmark``,
  ``train.channels_last``, ``train.find_unused_parameters``, ``train.allow_world_size_change``, ``data.root``,
  ``data.download``, ``data.workers``, ``data.pin_memory``, ``data.test_batch_size`` (evaluation only),
  ``name``, ``output_dir`` and KD's ``method.teacher_checkpoint`` (the teacher's weights are restored from
  ``last.pt``; the path only has to exist). They are applied as given.
- **applied to the restored state** (:data:`APPLIED`): ``optim.milestones``. The restored schedulers take the
  new milestones, so the next epochs' learning rates follow them (extending a run with later decays); the
  milestones that fall within the epochs already trained must stay as they were.
- **refused**: every other key (the recipe: its name ``recipe``, ``seed``, ``model.*`` with the cohort's
  ``model.members``, the data set and its augmentation and batch size, ``optim.lr``/``momentum``/``weight_decay``/
  ``gamma``/``schedule``..., ``train.precision``, ``train.max_steps_per_epoch``, ``train.sync_bn``, every
  ``method.*`` key). The restored state was trained with the saved value; the error names the key and both
  values. A key okd adds later is refused until it is listed here.

So the config a resumed run saves (``config.yaml``, ``last.pt``) is the one in effect. Before anything is
written, the ``last.pt`` is also checked against its own folder: a checkpoint whose method, model, dataset,
seed or class count differs from the folder's ``config.yaml``/``deploy.pt``, or whose epochs disagree with
``metrics.csv``, belongs to another run and is refused. Every resume appends one JSON line to
``resume_history.jsonl`` in the run folder: UTC time, the command line, the epoch it continued from and the
changed keys (old and new values).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from okd.config import RUNTIME_KEYS
from okd.data.cifar import SPECS
from okd.errors import CheckpointError, ConfigError
from okd.methods.build import build_config
from okd.models.deploy_file import read_deploy
from okd.runs.metrics import read_metrics_csv

#: keys that only say where and how the run executes; applied on resume as given: the runtime keys a recipe may
#: not set either (:data:`okd.config.RUNTIME_KEYS`), the epochs, the evaluation batch, the run's name and place,
#: and KD's teacher path
MAY_CHANGE = RUNTIME_KEYS | {
    "train.epochs",
    "data.test_batch_size",
    "name",
    "output_dir",
    "method.teacher_checkpoint",
}
#: recipe keys that :func:`restore_optimization` applies to the restored schedulers
APPLIED = frozenset({"optim.milestones"})
HISTORY_FILE = "resume_history.jsonl"


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists and tuples kept as lists)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = list(value) if isinstance(value, list | tuple) else value
    return out


def changed_keys(saved: dict, asked: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, asked value)}`` for every key whose value differs."""
    a, b = flatten(saved), flatten(asked)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _past_milestones(milestones: list[int], epochs_done: int) -> list[int]:
    return sorted(m for m in milestones if m < epochs_done)


def check_changes(saved: dict, asked: dict, epochs_done: int) -> dict[str, tuple[Any, Any]]:
    """The changes of ``asked`` (the resume's resolved config) over ``saved`` (the one ``last.pt`` was trained
    with), or :class:`ConfigError` naming every key that cannot change."""
    changes = changed_keys(saved, asked)
    refused = [k for k in changes if k not in MAY_CHANGE | APPLIED]
    if refused:
        what = ", ".join(f"{k}={_show(changes[k][0])} (asked {_show(changes[k][1])})" for k in refused)
        raise ConfigError(
            f"cannot change {', '.join(refused)} on resume: the restored state was trained with {what}. A resumed "
            "run continues the state in last.pt, which only the saved recipe produced; resume without these "
            "overrides, or start a new run (another name=...) with them. Keys that may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE | APPLIED))}."
        )
    epochs = changes.get("train.epochs", (None, asked["train"]["epochs"]))[1]
    if epochs < epochs_done:
        raise ConfigError(
            f"cannot set train.epochs={epochs} on resume: the run has already trained {epochs_done} epochs; "
            f"give train.epochs >= {epochs_done}"
        )
    if "optim.milestones" in changes:
        old, new = changes["optim.milestones"]
        if _past_milestones(old, epochs_done) != _past_milestones(new, epochs_done):
            raise ConfigError(
                f"cannot change optim.milestones from {old} to {new} on resume: {epochs_done} epochs were already "
                f"trained with the decays at {_past_milestones(old, epochs_done) or 'none'}; on resume only "
                f"milestones >= {epochs_done} may be added, moved or removed. Start a new run for the others."
            )
    return changes


def resume_changes(ckpt: dict, cfg) -> dict[str, tuple[Any, Any]]:
    """:func:`check_changes` of the resolved config ``cfg`` (a :class:`~okd.config.Config`) over the one the
    run checkpoint ``ckpt`` was trained with (with today's defaults for keys it predates)."""
    return check_changes(build_config(ckpt["config"]).to_dict(), cfg.to_dict(), int(ckpt["epoch"]))


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


# ------------------------------------------------------------------------------------------ the restored state
def restore_optimization(plan, ckpt: dict) -> None:
    """``plan.load_state_dict(ckpt)``, then give the restored schedulers the milestones of the config in effect
    (the plan was built from it), so the next epochs' learning rates follow them. Unchanged milestones leave
    the restored state untouched (bitwise-exact resume)."""
    fresh = [getattr(s, "milestones", None) for s in plan.schedulers]
    plan.load_state_dict(ckpt)
    for sched, milestones in zip(plan.schedulers, fresh, strict=True):
        if milestones is None or _as_list(milestones) == _as_list(sched.milestones):
            continue
        sched.milestones = Counter(milestones) if isinstance(milestones, Counter) else milestones
        if isinstance(sched.milestones, Counter):  # MultiStepLR: closed form at the restored epoch count
            count = bisect.bisect_right(sorted(sched.milestones.elements()), sched.last_epoch)
            lrs = [base * sched.gamma**count for base in sched.base_lrs]
        else:  # IterationLR: closed form in its step counter
            lrs = sched.get_lr()
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = list(lrs)


def _as_list(milestones) -> list[int]:
    return sorted(milestones.elements()) if isinstance(milestones, Counter) else sorted(milestones)


# --------------------------------------------------------------------------------- the checkpoint and its folder
def identity(cfg: dict) -> dict[str, Any]:
    """What tells one run from another: method, model (or the cohort's members), data set and seed."""
    model = cfg.get("model") or {}
    return {
        "method": (cfg.get("method") or {}).get("name"),
        "model": model.get("name"),
        "model.members": model.get("members"),
        "dataset": (cfg.get("data") or {}).get("dataset"),
        "seed": cfg.get("seed"),
    }


def check_belongs_to_folder(run_dir: Path, ckpt: dict) -> None:
    """Refuse a ``last.pt`` that another run wrote: its method, model, dataset, seed or class count differs
    from the folder's ``config.yaml``/``deploy.pt``, or its epochs disagree with ``metrics.csv``."""
    last = run_dir / "last.pt"
    mine = identity(ckpt["config"])
    where = (
        f"{last} does not belong to the run in {run_dir}"
        " (copied from another run?); nothing was changed. Put the run's own last.pt back, or resume the "
        "checkpoint in its own folder"
    )
    folder_cfg = run_dir / "config.yaml"
    if folder_cfg.is_file():
        try:
            theirs = identity(yaml.safe_load(folder_cfg.read_text(encoding="utf-8")) or {})
        except (yaml.YAMLError, AttributeError):
            theirs = None
        if theirs is not None:
            diff = [f"{k} {mine[k]!r} vs config.yaml's {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
            if diff:
                raise CheckpointError(f"{where}: {'; '.join(diff)}")
    classes = _class_counts(run_dir, ckpt)
    others = {k: v for k, v in classes.items() if k != "deploy.pt"}
    if len(set(others.values())) > 1 or (len(others) == 1 and len(set(classes.values())) > 1 and "last.pt" in others):
        raise CheckpointError(f"{where}: class counts differ ({', '.join(f'{k}: {v}' for k, v in classes.items())})")
    deployed, expected = classes.get("deploy.pt"), next(iter(others.values()), None)
    if deployed is not None and expected is not None and deployed != expected:
        source = next((f"the run's data set ({k})" for k in classes if k != "last.pt"), "the run's last.pt")
        raise CheckpointError(
            f"{run_dir / 'deploy.pt'} holds a {deployed}-class network, but {source} has {expected} classes: "
            "that deploy.pt is not this run's (copied from another run?). Put the run's own deploy.pt back, or "
            f"remove it and resume (`okd train --resume {run_dir}` rewrites it from last.pt)"
        )
    _check_metrics(run_dir, ckpt, where)


def _class_counts(run_dir: Path, ckpt: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    if isinstance(ckpt.get("num_classes"), int):
        counts["last.pt"] = ckpt["num_classes"]
    dataset = identity(ckpt["config"])["dataset"]
    if dataset in SPECS:
        counts[f"{dataset}"] = SPECS[dataset].num_classes
    deploy = run_dir / "deploy.pt"
    if deploy.is_file():
        try:
            counts["deploy.pt"] = int(read_deploy(deploy)["num_classes"])
        except CheckpointError:
            pass  # an unreadable deploy.pt is rewritten by the next save
    return counts


def _check_metrics(run_dir: Path, ckpt: dict, where: str) -> None:
    path = run_dir / "metrics.csv"
    history = ckpt.get("history") or []
    if not path.is_file() or not history:
        return
    try:
        rows = read_metrics_csv(path)
    except (OSError, ValueError):
        return  # rewritten from last.pt's history by the next save
    for saved, row in zip(history, rows, strict=False):
        keys = [k for k in saved if k.startswith("test/") or k == "epoch"]
        bad = [k for k in keys if k not in row or not _close(float(saved[k]), row[k])]
        if bad or set(k for k in row if k.startswith("test/")) != set(k for k in saved if k.startswith("test/")):
            key = bad[0] if bad else "the test columns"
            raise CheckpointError(
                f"{where}: metrics.csv epoch {int(row.get('epoch', 0))} disagrees with last.pt's history ({key})"
            )


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-8, abs_tol=1e-8)


# ---------------------------------------------------------------------------------------------- the history
def record_resume(run_dir: Path, epochs_done: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to ``run_dir/resume_history.jsonl``: time, command line, epoch, changed keys."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(sys.argv),
        "resumed_after_epoch": int(epochs_done),
        "changed": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
    }
    with open(run_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(run_dir: str | Path) -> list[dict]:
    """The resume entries of a run folder, oldest first (empty for a run never resumed)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
