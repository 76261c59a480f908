"""``okd sweep``: configs under several seeds (and one recipe), run one after another, printed for a cluster,
or submitted through submitit (``--launcher``, :mod:`okd.report.launch`).

Run ``i`` is named ``<name>_s<seed>``, where ``<name>`` is the config's ``name`` (or ``name=`` override) and
defaults to ``<dataset>_<method>_<model>`` (``_<recipe>`` added under a recipe other than the method's own:
:func:`okd.engine.trainer.run_stem`). A run folder that already holds a run is resumed (a finished one is left
as it is), so re-running a sweep after an interruption completes it. A config may carry overrides of its own
(:class:`SweepEntry`, e.g. another backbone), as the entries of a sweep file do (:mod:`okd.report.sweep_file`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from okd.config import Config
from okd.engine.trainer import run_dir_for, run_stem, train
from okd.errors import ConfigError
from okd.methods.build import load_config


@dataclass(frozen=True)
class SweepEntry:
    """One config of a sweep with overrides of its own (applied before the sweep's common ones)."""

    config: str
    overrides: tuple[str, ...] = ()

    def describe(self) -> str:
        return " ".join([self.config, *self.overrides])


def _strip(overrides: list[str], key: str) -> tuple[list[str], str | None]:
    """``overrides`` without ``key=...`` and the last value given for it."""
    kept, value = [], None
    for item in overrides:
        if item.split("=", 1)[0].strip() == key:
            value = item.split("=", 1)[1]
        else:
            kept.append(item)
    return kept, value


def base_name(cfg: Config) -> str:
    return cfg.run.name or run_stem(cfg)


def with_recipe(overrides: list[str], recipe: str | None) -> list[str]:
    """``overrides`` with ``recipe=<recipe>`` (every run of the sweep under that recipe); ``None``: unchanged."""
    if recipe is None:
        return list(overrides)
    _, given = _strip(list(overrides), "recipe")
    if given is not None and given != recipe:
        raise ConfigError(f"--recipe {recipe} and the override recipe={given} disagree; give the recipe once")
    return [*_strip(list(overrides), "recipe")[0], f"recipe={recipe}"]


Configs = str | Path | SweepEntry | list[str | Path | SweepEntry]


def _entries(configs: Configs) -> list[SweepEntry]:
    items = list(configs) if isinstance(configs, list | tuple) else [configs]
    return [c if isinstance(c, SweepEntry) else SweepEntry(str(c)) for c in items]


def sweep_plan(
    configs: Configs, seeds: list[int], overrides: list[str] = ()
) -> list[tuple[str, int, list[str], Config]]:
    """For each config and seed: ``(config, seed, overrides for okd train, resolved config)``; validates every
    config first and refuses two runs that would share a run folder."""
    if not seeds:
        raise ConfigError("okd sweep needs at least one seed (--seeds 1 2 3)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has repeats: {seeds}")
    entries = _entries(configs)
    if not entries:
        raise ConfigError("okd sweep needs a config")
    overrides, _ = _strip(list(overrides), "seed")
    rest, name = _strip(overrides, "name")
    if name and len(entries) > 1:
        raise ConfigError(f"name={name} would give every config's runs the same folders; drop it for several configs")
    plan = []
    for entry in entries:
        own = list(entry.overrides)
        if any(item.split("=", 1)[0].strip() in ("seed", "name") for item in own):
            raise ConfigError(f"{entry.describe()}: a sweep entry sets neither seed nor name (the sweep does)")
        base = name or base_name(load_config(entry.config, [*own, *rest]))
        for seed in seeds:
            items = [*own, *rest, f"seed={seed}", f"name={base}_s{seed}"]
            plan.append((entry.config, seed, items, load_config(entry.config, items)))

    folders = [run_dir_for(cfg) for *_, cfg in plan]
    if len(set(folders)) != len(folders):
        twice = sorted({str(f) for f in folders if folders.count(f) > 1})
        raise ConfigError(f"two runs of the sweep would write the same run folder: {', '.join(twice)}")
    return plan


def sweep_commands(configs: Configs, seeds: list[int], overrides: list[str] = ()) -> list[str]:
    """One ``okd train`` shell command per config and seed (for a cluster's job script)."""
    return [
        shlex.join(["okd", "train", config, *items]) for config, _, items, _ in sweep_plan(configs, seeds, overrides)
    ]


def run_sweep(configs: Configs, seeds: list[int], overrides: list[str] = ()) -> list[Path]:
    """Train every config and seed in turn (resuming folders that already hold a run); returns the run folders."""
    done = []
    for _, seed, _, cfg in sweep_plan(configs, seeds, overrides):
        run_dir = run_dir_for(cfg)
        resume = (run_dir / "last.pt").exists()
        print(f"okd sweep: seed {seed} -> {run_dir}{' (resuming)' if resume else ''}", flush=True)
        done.append(train(cfg, run_dir=run_dir, resume=resume))
    return done
