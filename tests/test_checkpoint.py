"""Atomic writes and checked loads."""

from __future__ import annotations

import pytest
import torch

from okd.engine.checkpoint import atomic_save, load_checkpoint, load_state_checked
from okd.errors import CheckpointError


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"epoch": 1, "blob": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "list.pt"
    torch.save([1, 2], other)
    with pytest.raises(CheckpointError, match="not written by okd"):
        load_checkpoint(other)


def test_mismatched_state_dict_is_explained():
    net = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_checked(net, torch.nn.Linear(4, 5).state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_checked(net, {"weight": net.weight.detach()}, "x.pt")
