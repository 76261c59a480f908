"""okd: online knowledge distillation in PyTorch."""

__version__ = "0.1.0"
