"""``model.name: timm:<name>``: any timm model (the ``okd[timm]`` extra; timm needs torchvision, so the core
imports neither unless a timm model is asked for).

Built with ``timm.create_model(name, pretrained=False, num_classes=K, **model.kwargs)``; nothing is downloaded:
``model.pretrained=true`` loads the local file ``model.weights`` through timm's own loader
(``pretrained_cfg_overlay={'file': ...}``, which drops a classifier of another width). Taps: ``model.taps`` if
given, else the modules timm's feature-extraction metadata (``feature_info``, as ``features_only`` uses) names
for its last three reductions, when they output feature maps (CNNs); other models (e.g. ViTs) get none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from okd.errors import ConfigError
from okd.models.external import ExternalNet, TappedNet


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(
            f"timm: models need timm (and torchvision): pip install 'okd[timm]' ({type(exc).__name__}: {exc})"
        ) from None
    return timm


def default_taps(net: nn.Module, count: int = 3) -> list[str]:
    """The modules of the last ``count`` distinct reductions of timm's ``feature_info`` (shallow to deep)."""
    info = getattr(net, "feature_info", None)
    if not info:
        return []
    by_reduction: dict[int, str] = {}
    for entry in info:
        by_reduction[int(entry.get("reduction", 0))] = str(entry.get("module", ""))
    names = [by_reduction[r] for r in sorted(by_reduction)]
    return [n for n in names[-count:] if n]


def create_timm(name: str, num_classes: int, kwargs: dict[str, Any], spec: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes=K, **kwargs)``, pretrained only from the local ``spec['weights']``."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:8]
        raise ConfigError(f"model.name=timm:{name}: timm has no model {name!r}; similar names: {close}")
    kw = dict(kwargs)
    pretrained = bool(spec.get("pretrained"))
    if pretrained:
        weights = Path(str(spec.get("weights") or "")).expanduser()
        if not weights.is_file():
            raise ConfigError(f"model.weights={str(weights)!r} (for model.pretrained=true) is not a file")
        kw["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
    except (TypeError, ValueError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ConfigError(f"model.name=timm:{name}: timm.create_model failed ({type(exc).__name__}: {text})") from None


def with_default_taps(net: nn.Module, num_classes: int, label: str, size: int) -> nn.Module:
    """``net`` with the taps of :func:`default_taps` when they are feature maps, else without taps."""
    auto = default_taps(net)
    if auto:
        try:
            return TappedNet(net, num_classes, auto, name=label, input_size=size)
        except ConfigError as exc:
            if "feature maps" not in str(exc):  # the taps are not B x C x H x W (e.g. tokens): no taps
                raise
    return ExternalNet(net, num_classes, name=label, input_size=size)
