"""``create_model``: any network okd can build, by registered name, import path, ``timm:`` name or run spec."""

from __future__ import annotations

from torch import nn

from okd.models.registry import MODELS
from okd.models.spec import build_from_spec, model_kind


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the backbone ``name`` with a ``num_classes``-way classifier.

    ``name`` may also be a :class:`~okd.models.spec.ModelRef` (a run's model section: the user's network by
    import path, a timm model, taps, ``branch_from``) or an import path / ``timm:`` name, built by
    :func:`~okd.models.spec.build_from_spec`.
    """
    if name in MODELS and not kwargs and not hasattr(name, "spec"):
        return MODELS.get(name)(num_classes=num_classes)
    if hasattr(name, "spec") or (":" in name and name not in MODELS):
        spec = dict(getattr(name, "spec", None) or {"name": str(name), "kind": model_kind(name)})
        spec["kwargs"] = {**dict(spec.get("kwargs") or {}), **kwargs}
        return build_from_spec(spec, num_classes)
    return MODELS.get(name)(num_classes=num_classes, **kwargs)
