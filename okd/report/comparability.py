"""Why a group of runs is not comparable with the published figures shown next to it.

A published figure is a full recipe's result: every training and test image, the recipe's epoch count, the
dataset's own classes. :func:`caveats` lists each way the runs depart from that, read from what the runs
recorded (``config.yaml``, ``metrics.csv``, ``deploy.pt``): a subset of the data (``data.limit_train``,
``data.limit_test``, ``train.max_steps_per_epoch``), fewer epochs than the runs' recipe trains (for runs that
name no recipe: the packaged config of the same method, backbone and dataset), or another class count than
the published dataset's (published rows are matched on the dataset itself).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import yaml

from okd.config import recipe_run
from okd.configs import PACKAGED, packaged_configs
from okd.errors import ConfigError
from okd.methods.build import load_config
from okd.report.published import PublishedRow

#: classes of the datasets published figures are reported on (okd ``data.dataset`` keys)
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "tinyimagenet": 200}


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = (cfg or {}).get(key) if isinstance(cfg, dict) else None
    return cfg


@functools.lru_cache(maxsize=64)
def recipe_epochs(dataset: str, method: str, model: str, recipe: str | None = None) -> tuple[str, int] | None:
    """``(what, its train.epochs)``: the runs' ``recipe`` when they name one (``what`` is its name), else the
    packaged config for this method, backbone and dataset (``what`` is the config's name).

    The config named ``<dataset>/<method>_<model>`` when it exists, else the packaged config of that dataset
    with this method and model that trains the fewest epochs; None when okd ships none.
    """
    if recipe is not None:
        try:
            return recipe, recipe_run(dataset, recipe).train.epochs
        except ConfigError:  # a recipe this okd does not ship (a newer okd's run): no epoch count to compare with
            return None
    found = []
    for path in sorted((PACKAGED / dataset).glob(f"{method}_*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        name = f"{dataset}/{path.stem}"
        if _get(cfg, "method.name") == method and _get(cfg, "model.name") == model and name in packaged_configs():
            epochs = load_config(name).run.train.epochs
            found.append((path.stem != f"{method}_{model}", epochs, name))
    if not found:
        return None
    _, epochs, name = min(found)
    return name, epochs


def run_num_classes(run_dir: Path) -> int | None:
    """The class count a run's ``deploy.pt`` records (None without one)."""
    path = Path(run_dir) / "deploy.pt"
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a readable deploy.pt: nothing to compare
        return None
    value = ckpt.get("num_classes") if isinstance(ckpt, dict) else None
    return int(value) if value is not None else None


def _limits(runs, key: str, what: str) -> str | None:
    values = sorted({v for r in runs if (v := _get(r.config, key)) is not None})
    if not values:
        return None
    shown = "/".join(map(str, values))
    return f"{what} ({key}={shown})"


def caveats(runs: list, published: list[PublishedRow]) -> list[str]:
    """Each reason the ``runs`` (pooled :class:`~okd.report.tables.RunResult`) are not comparable with the
    ``published`` rows shown beside them; empty when they are (or nothing is published)."""
    if not published or not runs:
        return []
    first = runs[0]
    out = [
        reason
        for reason in (
            _limits(runs, "data.limit_train", "trained on a subset of the training images"),
            _limits(runs, "data.limit_test", "scored on a subset of the test images"),
            _limits(runs, "train.max_steps_per_epoch", "trained on part of each epoch"),
        )
        if reason
    ]
    recipe = recipe_epochs(first.dataset, first.method, first.model, first.recipe)
    trained = min(min(r.epochs_done, r.epochs or r.epochs_done) for r in runs)
    if recipe is not None and trained < recipe[1]:
        out.append(f"{trained} epoch(s) trained; the recipe ({recipe[0]}) trains {recipe[1]}")
    want = DATASET_CLASSES.get(first.dataset)  # published rows are matched on the dataset: theirs is the run's
    have = sorted({n for r in runs if (n := run_num_classes(r.path)) is not None})
    if want is not None and any(n != want for n in have):
        shown = "/".join(map(str, have))
        out.append(f"the runs classify {shown} classes; {first.dataset}, as published, has {want}")
    return out
