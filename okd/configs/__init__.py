"""The recipes shipped with okd: ``okd train cifar100/ffsd_resnet32`` works from any directory.

A config is named by its path below this folder without ``.yaml`` (``cifar10/ffsd_resnet20``); the
checkout's ``configs/`` is a link to this folder, so ``configs/cifar10/ffsd_resnet20.yaml`` names the same file.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent


def packaged_configs() -> list[str]:
    """Every packaged config name, sorted (``cifar10/baseline_resnet20``, ...)."""
    return sorted(p.relative_to(PACKAGED).with_suffix("").as_posix() for p in PACKAGED.rglob("*.yaml"))


def resolve_config(name: str | Path) -> Path | None:
    """The file a config argument names: an existing path first, else a packaged name.

    ``cifar10/ffsd_resnet20``, ``cifar10/ffsd_resnet20.yaml`` and ``configs/cifar10/ffsd_resnet20.yaml``
    all name the packaged file when no such file exists relative to the working directory. ``None`` when
    nothing matches.
    """
    path = Path(name)
    if path.is_file():
        return path
    text = path.as_posix()
    for prefix in ("./", "configs/", "okd/configs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    candidate = PACKAGED / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    return candidate if candidate.is_file() else None
