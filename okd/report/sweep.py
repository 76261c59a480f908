"""``okd sweep``: the same config under several seeds, run one after another or printed for a cluster.

Run ``i`` is named ``<name>_s<seed>``, where ``<name>`` is the config's ``name`` (or ``name=`` override) and
defaults to ``<dataset>_<method>_<model>``. A run folder that already holds a run is resumed (a finished one
is left as it is), so re-running a sweep after an interruption completes it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from okd.config import Config, load_config
from okd.errors import ConfigError


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


def sweep_plan(config: str | Path, seeds: list[int], overrides: list[str] = ()) -> list[tuple[int, list[str], Config]]:
    """For each seed: ``(seed, overrides for okd train, resolved config)``; validates every config first."""
    if not seeds:
        raise ConfigError("okd sweep needs at least one seed (--seeds 1 2 3)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has repeats: {seeds}")
    overrides, _ = _strip(list(overrides), "seed")
    rest, name = _strip(overrides, "name")
    base = name or base_name(load_config(config, rest))
    plan = []
    for seed in seeds:
        items = [*rest, f"seed={seed}", f"name={base}_s{seed}"]
        plan.append((seed, items, load_config(config, items)))
    return plan


def sweep_commands(config: str | Path, seeds: list[int], overrides: list[str] = ()) -> list[str]:
    """One ``okd train`` shell command per seed (for a cluster's job script)."""
    return [shlex.join(["okd", "train", str(config), *items]) for _, items, _ in sweep_plan(config, seeds, overrides)]


def run_sweep(config: str | Path, seeds: list[int], overrides: list[str] = ()) -> list[Path]:
    """Train every seed in turn (resuming folders that already hold a run); returns the run folders."""
    from okd.engine.trainer import run_dir_for, train

    done = []
    for seed, _, cfg in sweep_plan(config, seeds, overrides):
        run_dir = run_dir_for(cfg)
        resume = (run_dir / "last.pt").exists()
        print(f"okd sweep: seed {seed} -> {run_dir}{' (resuming)' if resume else ''}", flush=True)
        done.append(train(cfg, run_dir=run_dir, resume=resume))
    return done
