"""train.device: ``auto`` picks CUDA where there is a GPU, else the CPU; a CUDA device without a GPU is refused."""

from __future__ import annotations

import pytest
import torch

from okd.engine import builder
from okd.engine.builder import resolve_device
from okd.errors import ConfigError


def test_auto_is_cuda_with_a_gpu_and_the_cpu_without(monkeypatch):
    monkeypatch.setattr(builder.torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    refused = r"train.device='cuda:1' but no CUDA device is available; use train.device=cpu"
    with pytest.raises(ConfigError, match=refused):
        resolve_device("cuda:1")
    monkeypatch.setattr(builder.torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
