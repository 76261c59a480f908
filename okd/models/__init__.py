"""Backbones: importing this package fills the model registry."""

from okd.models import (  # noqa: F401  (each import fills the registry)
    cmff_vgg,
    densenet,
    googlenet,
    resnet_cifar,
    resnet_imagenet,
    vgg,
    wide_resnet,
)
from okd.models.complexity import count_macs, count_parameters
from okd.models.factory import create_model
from okd.models.registry import list_models, register_model

__all__ = ["count_macs", "count_parameters", "create_model", "list_models", "register_model"]
