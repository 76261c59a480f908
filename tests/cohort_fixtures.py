"""A network of the user's own beside a registered one: the mixed cohorts of the cohort tests (``import
cohort_fixtures``; tests/methods/test_members.py and tests/engine/test_mixed_cohort_engine.py).

:func:`user_module` writes :data:`MODULE` (``small``: a two-stage CNN whose deepest map is 16 x 16 on CIFAR, where
resnet20's is 8 x 8) into a folder, puts it on ``sys.path`` and allows okd to import it when it reads a run back
(``OKD_ALLOW_IMPORT``); :func:`mixed_overrides` are the overrides of a tiny deterministic CPU run of a mixed cohort.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import helpers

MODULE = "okd_cohort_nets"
SMALL = f"{MODULE}:small"
CODE = """
from torch import nn


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Small(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.stem = block(3, width, 1)
        self.layer1 = block(width, width, 2)
        self.layer2 = block(width, 2 * width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layer2(self.layer1(self.stem(x))))))


def small(num_classes, width=8):
    return Small(num_classes, width)
"""


@contextlib.contextmanager
def user_module(folder: Path) -> Iterator[str]:
    """:data:`MODULE` written to ``folder``, importable and allowed while the context lasts; yields ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(CODE))
    sys.path.insert(0, str(folder))
    before = os.environ.get("OKD_ALLOW_IMPORT")
    os.environ["OKD_ALLOW_IMPORT"] = MODULE
    try:
        yield str(folder)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)
        if before is None:
            os.environ.pop("OKD_ALLOW_IMPORT", None)
        else:
            os.environ["OKD_ALLOW_IMPORT"] = before


def mixed_overrides(root: Path, out: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """A tiny deterministic CPU run on the CIFAR-10 subset (64 training images, 2 steps an epoch); ``extra``
    names the method and the members."""
    settings = {
        "data.dataset": "cifar10",
        "data.limit_train": 64,
        "data.limit_test": 48,
        "data.batch_size": 16,
        "data.test_batch_size": 48,
        "train.max_steps_per_epoch": 2,
        "seed": 3,
    }
    return [*helpers.quick_overrides(root, out, name, epochs, settings), *extra]
