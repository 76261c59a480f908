"""The configs and recipes shipped with okd: ``okd train cifar100/ffsd_resnet32`` works from any directory.

A config is named by its path below this folder without ``.yaml`` (``cifar10/ffsd_resnet20``); the
checkout's ``configs/`` is a link to this folder, so ``configs/cifar10/ffsd_resnet20.yaml`` names the same file.

A recipe (``recipes/<dataset>/<name>.yaml``) is the training side of a paper's setup: data pipeline, optimiser,
schedule, epochs, batch. A packaged config names one (``recipe: okddip``) and holds only its model and
method; :func:`okd.config.compose` merges them (docs/recipes.md). This module only finds and reads the files.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

from okd.errors import ConfigError

PACKAGED = Path(__file__).resolve().parent
RECIPES = PACKAGED / "recipes"


def packaged_configs() -> list[str]:
    """Every packaged config name, sorted (``cifar10/baseline_resnet20``, ...); the recipes are not configs."""
    names = (p.relative_to(PACKAGED) for p in PACKAGED.rglob("*.yaml"))
    return sorted(p.with_suffix("").as_posix() for p in names if p.parts[0] != RECIPES.name)


def resolve_config(name: str | Path) -> Path | None:
    """The file a config argument names: an existing path first, else a packaged name.

    ``cifar10/ffsd_resnet20``, ``cifar10/ffsd_resnet20.yaml`` and ``configs/cifar10/ffsd_resnet20.yaml``
    all name the packaged file when no such file exists relative to the working directory. ``None`` when
    nothing matches (a packaged recipe is not a config).
    """
    path = Path(name)
    if path.is_file():
        return path
    text = path.as_posix()
    for prefix in ("./", "configs/", "okd/configs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if text.startswith(f"{RECIPES.name}/"):
        return None
    candidate = PACKAGED / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    return candidate if candidate.is_file() else None


def close_configs(name: str | Path) -> list[str]:
    """Packaged config names close to a mistyped ``name`` (best first; empty when none is close).

    ``cifar10/ffsd_resnt20`` suggests ``cifar10/ffsd_resnet20``; a name without its data set folder
    (``ffsd_resnt20``) is compared with the part after the folder, and suggests every data set's config of
    that name."""
    text = Path(name).as_posix()
    for prefix in ("./", "okd/configs/", "configs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.removesuffix(".yaml").removesuffix(".yml")
    known = packaged_configs()
    if "/" in text:
        return difflib.get_close_matches(text, known, n=1, cutoff=0.75)
    stems = sorted({k.split("/", 1)[-1] for k in known})
    close = difflib.get_close_matches(text, stems, n=1, cutoff=0.75)
    return [k for k in known if close and k.split("/", 1)[-1] == close[0]]


# --------------------------------------------------------------------------------------------------- recipes
def recipe_datasets() -> list[str]:
    """The datasets (``data.dataset`` values) okd ships recipes for."""
    return sorted(p.name for p in RECIPES.iterdir() if p.is_dir())


def recipe_names(dataset: str) -> list[str]:
    """The recipes of ``dataset``, sorted (empty for a dataset without any)."""
    return sorted(p.stem for p in (RECIPES / dataset).glob("*.yaml"))


def recipe_file(dataset: str, name: str) -> Path:
    """The file of recipe ``name`` for ``dataset``, or a :class:`ConfigError` listing the known ones."""
    known = recipe_names(dataset) if dataset in recipe_datasets() else []
    path = RECIPES / str(dataset) / f"{name}.yaml"
    if known and isinstance(name, str) and name in known and path.is_file():
        return path
    if not known:
        have = ", ".join(recipe_datasets())
        raise ConfigError(
            f"recipe={name!r}: okd ships no recipes for data.dataset={dataset} (it has recipes for {have}); "
            "drop recipe= and give the settings themselves (docs/recipes.md)"
        )
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"unknown recipe {name!r} for {dataset}{hint} Known recipes for {dataset}: {', '.join(known)} "
        "(`okd recipes` describes them)"
    )


def read_recipe(dataset: str, name: str) -> dict:
    """The mapping recipe ``name`` of ``dataset`` holds (its ``description`` included), as written."""
    path = recipe_file(dataset, name)
    body = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping (description, data, optim, train, seed)")
    return body


def packaged_recipe(dataset: str, method: str, model: str) -> str | None:
    """The recipe okd's own configs of this method use on ``dataset``: the one most of its configs for ``model``
    name, else the one most of its configs for any backbone name; None without any."""
    found: list[tuple[str, str]] = []  # (recipe, model) of each config of the method
    for path in sorted((PACKAGED / dataset).glob("*.yaml")) if dataset != RECIPES.name else []:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if (raw.get("method") or {}).get("name") == method and raw.get("recipe"):
            found.append((raw["recipe"], (raw.get("model") or {}).get("name")))
    chosen = [r for r, m in found if m == model] or [r for r, _ in found]
    return max(sorted(set(chosen)), key=chosen.count) if chosen else None
