"""Backbones: importing this package fills the model registry."""

from okd.models import (  # noqa: F401  (each import fills the registry)
    cmff_vgg,
    densenet,
    googlenet,
    hcgnet,
    mobilenet,
    resnet_cifar,
    resnet_imagenet,
    shufflenetv2,
    vgg,
    wide_resnet,
    wide_resnet_crd,
    wide_resnet_switokd,
)
from okd.models.complexity import count_macs, count_parameters
from okd.models.factory import create_model
from okd.models.registry import list_models, register_model

__all__ = ["count_macs", "count_parameters", "create_model", "list_models", "register_model"]
