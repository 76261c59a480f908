"""Safe file I/O, the leaf every layer may use: atomic writes, checkpoint loads that never run code, key and
shape checks. Every unreadable file (missing, empty, truncated, a folder, foreign) gets okd's own message."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from okd.errors import CheckpointError, UnsafeCheckpointError


def _atomic_write(
    path: str | Path, mode: str, write: Callable[[IO], None], on_boundary: Callable[[str], None] | None = None
) -> None:
    """Write through ``write(f)`` to a temporary file in the same folder, fsync, then rename over ``path``.

    The file gets the permissions of a plainly created one (0666 less the umask; ``mkstemp`` alone gives 0600).
    ``on_boundary("before")`` runs just before the rename and ``on_boundary("after")`` just after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if on_boundary is not None:
            on_boundary("before")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if on_boundary is not None:
        on_boundary("after")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path, on_boundary: Callable[[str], None] | None = None) -> None:
    """``torch.save`` atomically: an interrupted write never damages an existing checkpoint."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f), on_boundary)


def atomic_write_text(text: str, path: str | Path, on_boundary: Callable[[str], None] | None = None) -> None:
    """Write a text file atomically (tmp + fsync + rename)."""
    _atomic_write(path, "w", lambda f: f.write(text), on_boundary)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` atomically (tmp + fsync + rename), like every okd output file."""
    _atomic_write(path, "wb", lambda f: f.write(data))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: what every refusal says: okd reads tensors and plain values only
NO_CODE = (
    "okd loads every checkpoint with torch.load(weights_only=True), which refuses to unpickle arbitrary "
    "objects; okd never loads code from a checkpoint"
)


def _weights_only_refusal(exc: Exception) -> str | None:
    """The global a ``weights_only`` load refused (``posix.system``, a class), or None for other failures."""
    text = str(exc)
    if "weights_only" not in text and "Weights only" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global:? ([\w.]+)", text, re.IGNORECASE)
    return found.group(1) if found else None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (``""`` for an empty one), for okd's own messages."""
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else ""


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", what: str = "checkpoint", hint: str = "", mmap: bool = False
) -> dict:
    """Load a ``torch.save`` file okd reads (last.pt, best.pt, deploy.pt, a teacher) as a dict of tensors and
    plain values, with ``weights_only=True``: a pickled object (code) is refused, never run. ``mmap``: map the
    tensors' storage instead of reading it (a reader that needs a record's epoch or history, not its weights,
    then reads a few kilobytes of a large file).

    Raises :class:`CheckpointError` naming ``what`` for a missing, truncated, foreign or refused file; ``hint``
    (what to give instead) ends the message of an unreadable file.
    """
    path = Path(path)
    hint = hint or "Use another checkpoint (last.pt, best.pt) of the run."
    if path.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is a folder, not a file. {hint}")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes): its write never completed. {hint}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        refused = _weights_only_refusal(exc)
        if refused is not None:
            raise UnsafeCheckpointError(
                f"{what} {str(path)!r} holds a pickled object ({refused}) that is not a tensor or plain value: "
                f"{NO_CODE}. Nothing from the file was run. If you wrote it yourself, save only tensors and "
                f"plain values (a state_dict); otherwise ask for the run's deploy.pt, or an `okd export "
                f"--format safetensors` file. {hint}"
            ) from None
        detail = first_line(exc) if "Weights only" not in str(exc) else "not a weights-only pickle"
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read ({type(exc).__name__}: {detail}); it is truncated, not a "
            f"PyTorch file, or holds pickled objects ({NO_CODE}). {hint}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {str(path)!r} does not hold a dict; it was not written by okd. {hint}")
    return obj


def require_keys(ckpt: dict, keys: tuple[str, ...] | list[str], path: str | Path, what: str = "checkpoint") -> None:
    """Fail with the missing key named (not a KeyError) when ``ckpt`` lacks one of ``keys``."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{what} {str(path)!r} lacks {', '.join(repr(k) for k in missing)} (it has: "
            f"{', '.join(sorted(map(str, ckpt))) or 'nothing'}); it is incomplete or was not written by this okd. "
            "Use another checkpoint of the run, or start a new run."
        )


def load_state_checked(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a short, readable error on mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} shape mismatches (e.g. {k}: checkpoint {tuple(state_dict[k].shape)} "
                f"vs model {tuple(own[k].shape)})"
            )
        raise CheckpointError(
            f"{what} does not match the model it is loaded into: {'; '.join(parts)}. "
            "Check that the model name, the number of classes and the method match those of the checkpoint."
        )
    module.load_state_dict(state_dict, strict=True)
