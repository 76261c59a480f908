"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``cifar-10-batches-py/``: a class-balanced 2,000/500 subset of CIFAR-10.

    Written once per session by ``../shared/data/make_cifar10.py`` (beside the repository); the tests
    that use it are skipped where that folder is absent.
    """
    script = SHARED_DATA / "make_cifar10.py"
    if not script.is_file() or not (SHARED_DATA / "cifar10-jpeg.npz").is_file():
        pytest.skip(f"real CIFAR-10 not available: {SHARED_DATA} lacks make_cifar10.py or cifar10-jpeg.npz")
    root = tmp_path_factory.mktemp("cifar10")
    cmd = [sys.executable, str(script), str(root), "--limit-train", "2000", "--limit-test", "500"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors run fastest, and most predictably on a busy 2-core machine, on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
