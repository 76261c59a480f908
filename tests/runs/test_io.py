"""Atomic writes and checked loads."""

from __future__ import annotations

import pytest
import torch

from okd.errors import CheckpointError
from okd.io import atomic_save, load_checkpoint, load_state_checked


def second_save_fails(tmp_path, monkeypatch, owner, name: str, replacement, error: type[BaseException]):
    """Save epoch 1 to ``tmp_path/last.pt``, then save epoch 2 with ``owner.name`` replaced so that it raises
    ``error``; checks that no temporary file is left beside it and returns the path."""
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)
    monkeypatch.setattr(owner, name, replacement)
    with pytest.raises(error):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    return path


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    path = second_save_fails(tmp_path, monkeypatch, torch, "save", broken_save, OSError)
    assert load_checkpoint(path)["epoch"] == 1


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
    with pytest.raises(CheckpointError, match="shape mismatches") as err:
        load_state_checked(net, torch.nn.Linear(4, 5).state_dict(), "x.pt")
    assert "(5, 4)" in str(err.value) and "(3, 4)" in str(err.value)  # the first mismatch, both shapes
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_checked(net, {"weight": net.weight.detach()}, "x.pt")


@pytest.mark.parametrize("write", ["save", "text"])
def test_the_file_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch, write):
    """The data reaches the disk before the rename makes it the checkpoint (then the folder entry is synced):
    a crash can leave the old file or the new one, never a renamed, empty file."""
    import os
    import stat

    from okd import io as checkpoint

    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = tmp_path / "last.pt"
    if write == "save":
        atomic_save({"epoch": 3}, path)
    else:
        checkpoint.atomic_write_text("epoch: 3\n", path)
    assert calls == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "dir")]
    monkeypatch.undo()
    if write == "save":
        assert load_checkpoint(path)["epoch"] == 3
    else:
        assert path.read_text() == "epoch: 3\n"


def test_atomic_save_creates_missing_folders(tmp_path):
    path = tmp_path / "runs" / "new" / "last.pt"
    atomic_save({"epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 1


def test_an_interrupt_after_the_rename_keeps_the_new_file_and_propagates(tmp_path, monkeypatch):
    """Ctrl-C between the rename and the folder sync: the new file stands and the interrupt is what surfaces."""
    from okd import io as checkpoint

    def interrupted(folder):
        raise KeyboardInterrupt

    path = second_save_fails(tmp_path, monkeypatch, checkpoint, "_fsync_dir", interrupted, KeyboardInterrupt)
    assert load_checkpoint(path)["epoch"] == 2
