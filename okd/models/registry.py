"""The backbone registry: ``create_model(name, num_classes)`` and ``list_models()``.

Every registered backbone is an ``nn.Module`` with
  - ``forward(x) -> logits``;
  - ``forward_taps(x) -> (logits, taps)``: ``taps`` is the list of tapped feature maps, shallow to deep,
    exactly those of ``methods.md`` §1.1 (the deepest tap is the map that feeds global pooling);
  - attributes ``num_classes``, ``feature_dim`` (classifier input width) and ``tap_channels``.
Taps are returned explicitly (no forward hooks), so no state leaks between calls.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from okd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, **info) -> Callable:
    """Register a backbone factory ``fn(num_classes, **kwargs) -> nn.Module``."""
    return MODELS.register(name, **info)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the backbone ``name`` with a ``num_classes``-way classifier.

    ``name`` may also be a :class:`~okd.models.spec.ModelRef` (a run's model section: the user's network by
    import path, a timm model, taps, ``branch_from``) or an import path / ``timm:`` name, built by
    :func:`~okd.models.spec.build_from_spec`.
    """
    if name in MODELS and not kwargs and not hasattr(name, "spec"):
        return MODELS.get(name)(num_classes=num_classes)
    if hasattr(name, "spec") or (":" in name and name not in MODELS):
        from okd.models.spec import build_from_spec, model_kind

        spec = dict(getattr(name, "spec", None) or {"name": str(name), "kind": model_kind(name)})
        spec["kwargs"] = {**dict(spec.get("kwargs") or {}), **kwargs}
        return build_from_spec(spec, num_classes)
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
