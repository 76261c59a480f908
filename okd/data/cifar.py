"""CIFAR-10/100 in the official python-pickle layout: reader and checksum-verified downloader."""

from __future__ import annotations

import hashlib
import http.client
import importlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np

from okd.errors import DataError


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR dataset lives and how its official files are laid out."""

    name: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    coarse_key: str | None = None
    coarse_names_key: str | None = None
    num_coarse: int = 0
    meta_required: bool = True

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def layout(self) -> str:
        return f"{self.folder}/{{{', '.join(self.files)}}}"


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        meta_required=False,
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        coarse_key="coarse_labels",
        coarse_names_key="coarse_label_names",
        num_coarse=20,
    ),
}

# Standard per-channel statistics on [0, 1] (docs/models.md#data-side-constants).
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class CifarSplit:
    """One split: ``images`` uint8 N x 3 x 32 x 32, ``labels`` int64 N (fine labels for CIFAR-100)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    coarse_labels: np.ndarray | None = None
    coarse_classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def get_spec(dataset: str) -> CifarSpec:
    if dataset not in SPECS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(SPECS)}")
    return SPECS[dataset]


def dataset_folder(root: str | os.PathLike, dataset: str) -> Path:
    """``root/<folder>``, or ``root`` itself when it already is the dataset folder."""
    spec = get_spec(dataset)
    root = Path(root).expanduser()
    if root.name == spec.folder and not (root / spec.folder).is_dir():
        return root
    return root / spec.folder


# --------------------------------------------------------------------------- reading


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what the official files hold (dicts, lists, numpy arrays): no arbitrary code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # written by numpy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module == "copy_reg":
            module = "copyreg"
        elif module == "__builtin__":
            module = "builtins"
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # numpy 1.x at runtime
            return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), name)


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".")


def _read_pickle(path: Path, spec: CifarSpec) -> dict[str, Any]:
    fix = (
        f"Delete {path.parent} and set data.download=true to fetch it again, or unpack a fresh copy of "
        f"{spec.archive} ({spec.url}) into data.root."
    )
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{spec.name}: file {path} is missing; the folder must hold {spec.layout()}. {fix}") from None
    except Exception as exc:  # truncated or corrupt pickles raise many types
        raise DataError(
            f"{spec.name}: file {path} is truncated or corrupt ({type(exc).__name__}: {_oneline(exc)}). {fix}"
        ) from None
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise DataError(f"{spec.name}: file {path} does not hold a dict of arrays (got {kind}). {fix}")
    return {_text(k): v for k, v in obj.items()}


def _labels(batch: dict, key: str, n: int, num: int, path: Path, spec: CifarSpec) -> np.ndarray:
    if key not in batch:
        raise DataError(
            f"{spec.name}: file {path} has no {key!r} entry (keys: {', '.join(sorted(batch))}); "
            f"it does not look like the official {spec.folder} layout."
        )
    labels = np.asarray(batch[key])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{spec.name}: file {path} has {key!r} of shape {labels.shape} and dtype {labels.dtype}; "
            f"expected {n} integers (one per image). The file is malformed: replace it with the official one."
        )
    if n and (labels.min() < 0 or labels.max() >= num):
        raise DataError(
            f"{spec.name}: file {path} has {key!r} values in [{labels.min()}, {labels.max()}], outside "
            f"[0, {num - 1}]. Is data.dataset right for this folder? Otherwise replace the file with the "
            f"official one."
        )
    return labels.astype(np.int64)


def _images(batch: dict, path: Path, spec: CifarSpec) -> np.ndarray:
    if "data" not in batch:
        raise DataError(
            f"{spec.name}: file {path} has no 'data' entry (keys: {', '.join(sorted(batch))}); "
            f"it does not look like the official {spec.folder} layout."
        )
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim not in (2, 4) or data.shape[1:] not in ((3072,), (3, 32, 32)):
        raise DataError(
            f"{spec.name}: file {path} has 'data' of shape {data.shape} and dtype {data.dtype}; expected "
            f"uint8 N x 3072 (channel-major 3 x 32 x 32 rows). The file is malformed: replace it with the "
            f"official one."
        )
    return data.reshape(-1, 3, 32, 32)


def _names(meta: dict | None, key: str | None, num: int, path: Path, spec: CifarSpec) -> list[str] | None:
    if meta is None or key is None:
        return None
    names = meta.get(key)
    if names is None or len(names) != num:
        raise DataError(
            f"{spec.name}: file {path} should list {num} class names under {key!r}; "
            f"got {'none' if names is None else len(names)}. Replace it with the official one."
        )
    return [_text(n) for n in names]


def _missing_message(spec: CifarSpec, root: Path, why: str) -> str:
    return (
        f"{spec.name} not found: {why}. Expected {root / spec.folder}/ holding {', '.join(spec.files)} "
        f"(the official python version, {spec.url}). Set data.download=true to download it into data.root, "
        f"or download {spec.archive} yourself and unpack it into data.root "
        f"(tar xzf {spec.archive} -C {root})."
    )


def load_cifar(root: str | os.PathLike, dataset: str, train: bool, download: bool = False) -> CifarSplit:
    """Read one split of CIFAR-10/100 from ``root/<folder>`` (downloading it first if asked and absent)."""
    spec = get_spec(dataset)
    folder = dataset_folder(root, dataset)
    if not folder.is_dir():
        if not download:
            raise DataError(_missing_message(spec, Path(root), f"there is no folder {folder}"))
        folder = download_cifar(root, dataset)
    images, labels, coarse = [], [], []
    for name in spec.train_files if train else spec.test_files:
        path = folder / name
        batch = _read_pickle(path, spec)
        data = _images(batch, path, spec)
        images.append(data)
        labels.append(_labels(batch, spec.label_key, len(data), spec.num_classes, path, spec))
        if spec.coarse_key is not None and spec.coarse_key in batch:
            coarse.append(_labels(batch, spec.coarse_key, len(data), spec.num_coarse, path, spec))
    meta_path = folder / spec.meta_file
    meta = None if not spec.meta_required and not meta_path.exists() else _read_pickle(meta_path, spec)
    classes = _names(meta, spec.names_key, spec.num_classes, meta_path, spec)
    if classes is None:
        n = spec.num_classes
        classes = list(CIFAR10_CLASSES) if n == len(CIFAR10_CLASSES) else [str(i) for i in range(n)]
    coarse_classes = None
    if meta is not None and spec.coarse_names_key in meta:
        coarse_classes = _names(meta, spec.coarse_names_key, spec.num_coarse, meta_path, spec)
    return CifarSplit(
        images=np.ascontiguousarray(np.concatenate(images)),
        labels=np.concatenate(labels),
        classes=classes,
        coarse_labels=np.concatenate(coarse) if len(coarse) == len(images) else None,
        coarse_classes=coarse_classes,
    )


# --------------------------------------------------------------------------- downloading


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
            return
        base = into.resolve()
        for member in tar.getmembers():  # refuse absolute paths, '..' and links on older Pythons
            target = (into / member.name).resolve()
            if base not in (target, *target.parents) or member.issym() or member.islnk():
                raise tarfile.TarError(f"unsafe member {member.name!r}")
        tar.extractall(into)


def download_cifar(root: str | os.PathLike, dataset: str) -> Path:
    """Download, MD5-check and unpack the official archive into ``root``; returns the dataset folder.

    The archive goes to a temporary file in ``root`` and is unpacked into a temporary folder that is
    renamed into place only when complete, so an interrupted download never leaves a partial dataset.
    """
    spec = get_spec(dataset)
    root = Path(root).expanduser()
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = _oneline(exc)
        raise DataError(f"cannot create data.root {root} to download {spec.name} into: {why}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.archive}.", suffix=".part", dir=root)
    os.close(fd)
    archive = Path(tmp_name)
    unpack = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=".tmp", dir=root))
    try:
        print(f"okd: downloading {spec.name} from {spec.url} into {root}", file=sys.stderr, flush=True)
        try:
            _fetch(spec.url, archive)
        except (URLError, OSError, http.client.HTTPException) as exc:
            reason = _oneline(getattr(exc, "reason", exc))
            raise DataError(
                f"could not download {spec.name} from {spec.url} ({reason}). Without network access, "
                f"download {spec.archive} elsewhere and unpack it into data.root so that "
                f"{root / spec.folder}/ holds {', '.join(spec.files)}; then run again."
            ) from None
        digest = _md5(archive)
        if digest != spec.md5:
            raise DataError(
                f"the {spec.name} archive downloaded from {spec.url} has MD5 {digest}, expected {spec.md5}: "
                f"the download is incomplete or corrupt. Run again to retry, or download {spec.archive} "
                f"yourself and unpack it into data.root so that {root / spec.folder}/ holds "
                f"{', '.join(spec.files)}."
            )
        try:
            _extract(archive, unpack)
        except (tarfile.TarError, OSError, EOFError) as exc:
            why = _oneline(exc)
            raise DataError(f"cannot unpack the {spec.name} archive from {spec.url}: {why}") from None
        extracted = unpack / spec.folder
        missing = [f for f in spec.files if not (extracted / f).is_file()]
        if missing and not (not spec.meta_required and missing == [spec.meta_file]):
            raise DataError(
                f"the {spec.name} archive from {spec.url} does not hold the expected layout {spec.layout()} "
                f"(missing: {', '.join(missing)})."
            )
        try:
            os.replace(extracted, folder)
        except OSError:
            if not folder.is_dir():  # another process may have finished first
                raise
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(unpack, ignore_errors=True)
    return folder
