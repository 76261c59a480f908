"""Shared fixtures (the only conftest.py: tests import it as ``conftest``, so no folder below has its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


#: names a folder holding an official-layout ``cifar-10-batches-py/`` to run the end-to-end tests on
CIFAR10_ENV = "OKD_CIFAR10"
SUBSET = {"train": 2000, "test": 500}  # class-balanced: 200 / 50 images per class


def user_cifar10(value: str) -> Path:
    """The ``cifar-10-batches-py/`` folder that ``$OKD_CIFAR10`` names (it or its parent)."""
    root = Path(value).expanduser()
    for folder in (root / "cifar-10-batches-py", root):
        if folder.name == "cifar-10-batches-py" and (folder / "test_batch").is_file():
            return folder
    raise pytest.UsageError(
        f"{CIFAR10_ENV}={value!r}: expected a folder containing cifar-10-batches-py/ in the official python layout "
        "(data_batch_1..5, test_batch, batches.meta)"
    )


def write_balanced_subset(source: Path, out: Path) -> None:
    """Write the class-balanced prefix subset of ``SUBSET`` from an official-layout folder into ``out``
    (the subset ``make_cifar10.py --limit-train 2000 --limit-test 500`` writes)."""
    import pickle

    import numpy as np

    def load(name: str) -> dict:
        with open(source / name, "rb") as f:
            return pickle.load(f, encoding="latin1")

    def dump(name: str, obj: dict) -> None:
        with open(out / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    out.mkdir(parents=True)
    for split, names in (("train", [f"data_batch_{b}" for b in range(1, 6)]), ("test", ["test_batch"])):
        batches = [load(n) for n in names]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        per = SUBSET[split] // 10
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(10)]))
        chunks = np.array_split(keep, len(names))
        for name, rows in zip(names, chunks, strict=True):
            dump(name, {"batch_label": f"{name} (subset)", "labels": labels[rows].tolist(), "data": data[rows]})
    dump("batches.meta", load("batches.meta"))


def prepare_cifar10(root: Path, user_folder: str | None) -> Path:
    """Fill ``root`` with ``cifar-10-batches-py/``: the 2,000/500 class-balanced subset of the user's own
    official-layout CIFAR-10 (``user_folder``), else of ``../shared/data``; skip, with the reason, without both."""
    if user_folder:
        write_balanced_subset(user_cifar10(user_folder), root / "cifar-10-batches-py")
        return root
    script = SHARED_DATA / "make_cifar10.py"
    if not script.is_file() or not (SHARED_DATA / "cifar10-jpeg.npz").is_file():
        pytest.skip(
            f"real CIFAR-10 not available: set {CIFAR10_ENV}=/folder/containing/cifar-10-batches-py, or provide "
            f"{SHARED_DATA}/make_cifar10.py and cifar10-jpeg.npz"
        )
    cmd = [sys.executable, str(script), str(root), "--limit-train", "2000", "--limit-test", "500"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``cifar-10-batches-py/``: a class-balanced 2,000/500 subset of CIFAR-10, written
    once per session from ``$OKD_CIFAR10`` (the folder containing the user's ``cifar-10-batches-py/``) or
    from ``../shared/data`` beside the repository (:func:`prepare_cifar10`)."""
    return prepare_cifar10(tmp_path_factory.mktemp("cifar10"), os.environ.get(CIFAR10_ENV))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher checkpoint for ``kd`` in the method tests: the state dict of a ``resnet20`` for 10 classes (seed 5)."""
    import torch

    from okd.models import create_model

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_model("resnet20", 10).state_dict(), path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors run fastest, and most predictably on a busy 2-core machine, on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """A test (or a run it makes) may switch deterministic kernels on for the process; the next test starts
    from the mode this one found, so no test passes or fails because of the order the suite runs in."""
    import torch

    mode, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
