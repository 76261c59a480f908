"""Fixtures of the method tests: a teacher checkpoint for ``kd``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from method_helpers import K

from okd.models import create_model


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("resnet20", K).state_dict(), path)
    return path
