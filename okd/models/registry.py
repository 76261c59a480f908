"""The backbone registry: ``create_model(name, num_classes)`` and ``list_models()``.

Every registered backbone is an ``nn.Module`` with
  - ``forward(x) -> logits``;
  - ``forward_taps(x) -> (logits, taps)``: ``taps`` is the list of tapped feature maps, shallow to deep,
    those ``docs/models.md`` lists per backbone (the deepest tap is the map that feeds global pooling);
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


def list_models() -> list[str]:
    return MODELS.names()
