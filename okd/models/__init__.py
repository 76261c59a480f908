"""Backbones: importing this package fills the model registry."""

from okd.models import densenet, googlenet, resnet_cifar, resnet_imagenet, vgg, wide_resnet  # noqa: F401  (fill the registry)
from okd.models.complexity import count_macs, count_parameters
from okd.models.registry import create_model, list_models, register_model

__all__ = ["count_macs", "count_parameters", "create_model", "list_models", "register_model"]
