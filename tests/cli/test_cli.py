"""The command-line entry point: help, listings."""

from __future__ import annotations

import helpers
import pytest

from okd.cli import main
from okd.methods import METHODS
from okd.models import list_models


def test_help_names_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "test", "models", "methods", "bench", "report", "sweep", "export", "predict"):
        assert command in out, command


def test_methods_lists_every_registered_method_with_its_paper(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(METHODS.names())
    for name, line in zip(METHODS.names(), lines, strict=True):
        assert line.startswith(name) and "[" in line


@pytest.mark.slow
def test_models_lists_counts_at_native_resolution(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(list_models())
    assert "472,756" in rows["resnet32"] and "69.13 M" in rows["resnet32"]
    assert "224x224" in rows["resnet18"] and "32x32" in rows["resnet20"]


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("cifar10/ffsd_resnt20", "(did you mean cifar10/ffsd_resnet20?)"),
        ("configs/cifar10/ffsd_resnt20.yaml", "(did you mean cifar10/ffsd_resnet20?)"),
        ("ffsd_resnt20", "(did you mean cifar10/ffsd_resnet20 or cifar100/ffsd_resnet20?)"),
        ("cifar100/dml_resnet23", "(did you mean cifar100/dml_resnet32?)"),
    ],
)
def test_a_mistyped_config_name_gets_a_did_you_mean(capsys, name, suggested):
    """A typo'd packaged config name is answered like a typo'd key: with the close names, before any data is read."""
    assert main(["train", name, "data.root=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert helpers.mentions(err, f"no packaged config has that name {suggested}"), err
    assert helpers.mentions(err, "`okd configs` lists the packaged ones"), err


def test_a_config_name_like_no_packaged_one_gets_no_suggestion(capsys):
    assert main(["config", "my_experiment.yaml"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and helpers.mentions(err, "no packaged config has that name;"), err
