"""Sweep files: a planned table as a YAML file that ``okd sweep --file`` runs in one command.

::

    description: one line
    recipe: ffsd                 # every run under this recipe (optional; --recipe replaces it)
    seeds: [0, 1, 2]             # --seeds replaces them
    overrides: [train.device=cuda]   # applied to every run (optional)
    runs:                        # a packaged config or YAML file, or one with overrides of its own
      - cifar100/dml_resnet32
      - {config: cifar100/cl_ilr_resnet32, overrides: [model.name=wrn16_2]}
    left_out:                    # what the table leaves out, and why (read by people, listed by --print)
      - {method: kd, reason: needs a trained teacher}
    expected_time: ...           # free-form: how long the sweep takes, measured how (read by people)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from okd.errors import ConfigError
from okd.report.sweep import SweepEntry

KEYS = ("description", "recipe", "seeds", "overrides", "runs", "left_out", "expected_time")


@dataclass
class SweepFile:
    path: Path
    runs: list[SweepEntry]
    seeds: list[int] = field(default_factory=list)
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    description: str = ""


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings, got {value!r}")
    return list(value)


def _entry(item, where: str) -> SweepEntry:
    if isinstance(item, str):
        return SweepEntry(item)
    if isinstance(item, dict) and isinstance(item.get("config"), str) and set(item) <= {"config", "overrides"}:
        return SweepEntry(item["config"], tuple(_strings(item.get("overrides"), f"{where}.overrides")))
    raise ConfigError(f"{where} must be a config name or {{config: NAME, overrides: [key=value, ...]}}, got {item!r}")


def load_sweep_file(path: str | Path) -> SweepFile:
    """Read and check a sweep file (:mod:`okd.report.sweep_file`); the configs are resolved by ``okd sweep``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping ({', '.join(KEYS)})")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)}")
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"sweep file {path} needs runs: a non-empty list of configs")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"sweep file {path}: seeds must be a list of integers, got {seeds!r}")
    recipe = raw.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(f"sweep file {path}: recipe must be a recipe name, got {recipe!r}")
    left_out = raw.get("left_out") or []
    if not isinstance(left_out, list) or not all(isinstance(i, dict) and "reason" in i for i in left_out):
        raise ConfigError(f"sweep file {path}: left_out must be a list of mappings, each with a reason")
    return SweepFile(
        path=path,
        runs=[_entry(item, f"{path}: runs[{i}]") for i, item in enumerate(runs)],
        seeds=list(seeds),
        recipe=recipe,
        overrides=_strings(raw.get("overrides"), f"{path}: overrides"),
        left_out=left_out,
        description=str(raw.get("description") or ""),
    )
