"""Optional extras (matplotlib, safetensors, onnx, submitit, timm, tensorboard): imported where they are used,
with the pip command that installs them when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from okd.errors import OKDError


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OKDError(
            f'this command needs {module.split(".")[0]}, an optional extra: pip install "okd[{extra}]"'
        ) from None


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
