"""The command-line entry point: help, listings."""

from __future__ import annotations

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


def test_models_lists_counts_at_native_resolution(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(list_models())
    assert "472,756" in rows["resnet32"] and "69.13 M" in rows["resnet32"]
    assert "224x224" in rows["resnet18"] and "32x32" in rows["resnet20"]
