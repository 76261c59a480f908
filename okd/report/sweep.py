"""``okd sweep``: configs under several seeds, run one after another, printed for a cluster, or submitted
through submitit (``--launcher``, :mod:`okd.report.launch`).

Run ``i`` is named ``<name>_s<seed>``, where ``<name>`` is the config's ``name`` (or ``name=`` override) and
defaults to ``<dataset>_<method>_<model>``. A run folder that already holds a run is resumed (a finished one
is left as it is), so re-running a sweep after an interruption completes it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from okd.config import Config
from okd.engine.trainer import run_dir_for, train
from okd.errors import ConfigError
from okd.methods.build import load_config


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
    r = cfg.run
    return r.name or f"{r.data.dataset}_{cfg.method_name}_{r.model.name}"


def _as_list(configs: str | Path | list[str | Path]) -> list[str | Path]:
    return list(configs) if isinstance(configs, list | tuple) else [configs]


def sweep_plan(
    configs: str | Path | list[str | Path], seeds: list[int], overrides: list[str] = ()
) -> list[tuple[str, int, list[str], Config]]:
    """For each config and seed: ``(config, seed, overrides for okd train, resolved config)``; validates every
    config first and refuses two runs that would share a run folder."""
    if not seeds:
        raise ConfigError("okd sweep needs at least one seed (--seeds 1 2 3)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has repeats: {seeds}")
    configs = _as_list(configs)
    if not configs:
        raise ConfigError("okd sweep needs a config")
    overrides, _ = _strip(list(overrides), "seed")
    rest, name = _strip(overrides, "name")
    if name and len(configs) > 1:
        raise ConfigError(f"name={name} would give every config's runs the same folders; drop it for several configs")
    plan = []
    for config in configs:
        base = name or base_name(load_config(config, rest))
        for seed in seeds:
            items = [*rest, f"seed={seed}", f"name={base}_s{seed}"]
            plan.append((str(config), seed, items, load_config(config, items)))

    folders = [run_dir_for(cfg) for *_, cfg in plan]
    if len(set(folders)) != len(folders):
        twice = sorted({str(f) for f in folders if folders.count(f) > 1})
        raise ConfigError(f"two runs of the sweep would write the same run folder: {', '.join(twice)}")
    return plan


def sweep_commands(configs: str | Path | list[str | Path], seeds: list[int], overrides: list[str] = ()) -> list[str]:
    """One ``okd train`` shell command per config and seed (for a cluster's job script)."""
    return [
        shlex.join(["okd", "train", config, *items]) for config, _, items, _ in sweep_plan(configs, seeds, overrides)
    ]


def run_sweep(configs: str | Path | list[str | Path], seeds: list[int], overrides: list[str] = ()) -> list[Path]:
    """Train every config and seed in turn (resuming folders that already hold a run); returns the run folders."""
    done = []
    for _, seed, _, cfg in sweep_plan(configs, seeds, overrides):
        run_dir = run_dir_for(cfg)
        resume = (run_dir / "last.pt").exists()
        print(f"okd sweep: seed {seed} -> {run_dir}{' (resuming)' if resume else ''}", flush=True)
        done.append(train(cfg, run_dir=run_dir, resume=resume))
    return done
