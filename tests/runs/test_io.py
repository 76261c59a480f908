"""Atomic writes and checked loads."""

from __future__ import annotations

import os
import stat

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
    sizes: list[int] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        calls.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file"))
        if not stat.S_ISDIR(info.st_mode):
            sizes.append(info.st_size)  # what the fsync makes durable: all of it, flushed first
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
    assert sizes == [path.stat().st_size]
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


def test_an_unreadable_checkpoint_names_the_error_and_its_first_line(tmp_path):
    """The message of a file torch cannot read gives the error type and the first line of its message only
    (torch's own messages run over several lines); a non-weights-only pickle is named as such."""
    from okd.io import first_line

    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(ValueError("")) == "" and first_line(ValueError("x" * 300), limit=5) == "xxxxx"
    truncated = tmp_path / "truncated.pt"
    atomic_save({"blob": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(truncated, what="teacher", hint="Give the teacher's deploy.pt.")
    msg = str(info.value)
    assert msg.startswith(f"teacher {str(truncated)!r} cannot be read (RuntimeError: PytorchStreamReader failed")
    detail = msg.split("(RuntimeError: ", 1)[1].split("); it is truncated", 1)[0]
    assert "\n" not in msg and 20 < len(detail) <= 200 and msg.endswith("Give the teacher's deploy.pt.")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle\nsecond line")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(garbage)
    assert "cannot be read (UnpicklingError: not a weights-only pickle); it is truncated" in str(info.value)
    assert str(info.value).endswith("Use another checkpoint (last.pt, best.pt) of the run.")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_a_plainly_created_file(tmp_path, umask):
    """mkstemp alone makes 0600 files; every atomic write gets 0666 less the umask, as open() would."""
    import os
    import stat

    from okd.io import atomic_write_bytes, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_save({"epoch": 1}, tmp_path / "a.pt")
        atomic_write_text("x\n", tmp_path / "b.txt")
        atomic_write_bytes(b"x", tmp_path / "c.bin")
    finally:
        os.umask(old)
    for name in ("a.pt", "b.txt", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_only_a_weights_only_refusal_is_reported_as_a_pickled_object():
    """The refused global is read from torch's weights-only message; any other failure, even one that mentions
    a global, is not called a pickled object."""
    from okd.io import _weights_only_refusal

    refusal = "Weights only load failed. ... Unsupported global: GLOBAL posix.system was not an allowed global"
    assert _weights_only_refusal(RuntimeError(refusal)) == "posix.system"
    assert _weights_only_refusal(RuntimeError("weights_only: global: builtins.eval")) == "builtins.eval"
    assert _weights_only_refusal(RuntimeError("PytorchStreamReader failed reading zip archive")) is None
    assert _weights_only_refusal(RuntimeError("unexpected GLOBAL posix.system in the stream")) is None
    assert _weights_only_refusal(RuntimeError("Weights only load failed: invalid load key")) is None


def test_an_empty_or_folder_shaped_checkpoint_gets_okds_message(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.pt' is empty \(0 bytes\): its write never completed"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"folder.pt' is a folder, not a file\. Use another checkpoint"):
        load_checkpoint(tmp_path / "folder.pt")


def test_unexpected_keys_are_counted_and_the_first_three_named():
    net = torch.nn.Linear(4, 3)
    extra = {name: torch.zeros(1) for name in ("a", "b", "c", "d")}
    with pytest.raises(CheckpointError) as info:
        load_state_checked(net, {**net.state_dict(), **extra}, "x.pt")
    assert str(info.value) == (
        "x.pt does not match the model it is loaded into: 4 unexpected keys (e.g. ['a', 'b', 'c']). "
        "Check that the model name, the number of classes and the method match those of the checkpoint."
    )
    with pytest.raises(CheckpointError) as info:
        load_state_checked(net, {"weight": net.weight.detach(), "e": torch.zeros(1)}, "x.pt")
    assert "loaded into: 1 missing keys (e.g. ['bias']); 1 unexpected keys (e.g. ['e']). Check" in str(info.value)


@pytest.mark.parametrize("refuses", ["open", "fsync"])
def test_a_folder_the_filesystem_cannot_open_or_sync_leaves_the_renamed_file_in_place(tmp_path, monkeypatch, refuses):
    """Some filesystems refuse to open or fsync a folder: the new file is already renamed into place, so the save
    succeeds all the same, and a folder descriptor that was opened is closed."""
    real_open, real_fsync, real_close = os.open, os.fsync, os.close
    opened: list[int] = []
    closed: list[int] = []

    def open_(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            if refuses == "open":
                raise OSError(22, "Invalid argument")
            opened.append(real_open(path, flags, *args, **kwargs))
            return opened[-1]
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) and refuses == "fsync":
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    def close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    atomic_save({"epoch": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert len(opened) == (refuses == "fsync") and set(opened) <= set(closed)
