"""CIFAR reader/downloader, the device-resident loader and build_loaders."""

from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import io
import math
import os
import pickle
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from okd.config import DataConfig
from okd.data import DATASET_STATS, DeviceLoader, build_loaders, load_cifar
from okd.data import cifar as cifar_mod
from okd.data.cifar import CIFAR10_CLASSES, SPECS, download_cifar
from okd.data.device_loader import m_per_class_order, split_holdout
from okd.errors import ConfigError, DataError
from okd.methods.build import load_config

# --------------------------------------------------------------------------- files in the official layout


def _dump(path: Path, obj: dict, *, bytes_keys: bool, protocol: int) -> None:
    def conv(v):
        if bytes_keys and isinstance(v, str):
            return v.encode("latin1")
        if bytes_keys and isinstance(v, list) and v and isinstance(v[0], str):
            return [s.encode("latin1") for s in v]
        return v

    obj = {(k.encode("latin1") if bytes_keys else k): conv(v) for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, per_batch=4, n_test=6, *, bytes_keys=False, protocol=2, meta=True):
    """CIFAR-10 files like the official ones (data N x 3072 uint8, 'labels' lists); returns the arrays."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    for split, files, n in (("train", train_files, per_batch), ("test", ["test_batch"], n_test)):
        imgs, labs = [], []
        for name in files:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, n).tolist()
            batch = {"batch_label": name, "data": data, "labels": labels, "filenames": ["x.png"] * n}
            _dump(folder / name, batch, bytes_keys=bytes_keys, protocol=protocol)
            imgs.append(data.reshape(n, 3, 32, 32))
            labs += labels
        out[split] = (np.concatenate(imgs), np.array(labs))
    if meta:
        _dump(
            folder / "batches.meta",
            {"label_names": CIFAR10_CLASSES, "num_vis": 3072},
            bytes_keys=bytes_keys,
            protocol=protocol,
        )
    return out


FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def write_cifar100(root: Path, n_train=12, n_test=5, *, bytes_keys=False, protocol=2, meta=True):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        fine[0] = 99
        coarse = rng.integers(0, 20, n).tolist()
        batch = {
            "filenames": ["x.png"] * n,
            "batch_label": split,
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": data,
        }
        _dump(folder / split, batch, bytes_keys=bytes_keys, protocol=protocol)
        out[split] = (data.reshape(n, 3, 32, 32), np.array(fine), np.array(coarse))
    if meta:
        _dump(
            folder / "meta",
            {"fine_label_names": FINE, "coarse_label_names": COARSE},
            bytes_keys=bytes_keys,
            protocol=protocol,
        )
    return out


# --------------------------------------------------------------------------- reader


@pytest.mark.parametrize("bytes_keys,protocol", [(False, 2), (True, 2), (False, 4), (True, 5)])
def test_read_cifar10(tmp_path, bytes_keys, protocol):
    ref = write_cifar10(tmp_path, bytes_keys=bytes_keys, protocol=protocol)
    for train, split in ((True, "train"), (False, "test")):
        s = load_cifar(tmp_path, "cifar10", train=train)
        assert s.images.dtype == np.uint8 and s.images.shape == ref[split][0].shape
        assert s.labels.dtype == np.int64
        np.testing.assert_array_equal(s.images, ref[split][0])
        np.testing.assert_array_equal(s.labels, ref[split][1])
        assert s.classes == CIFAR10_CLASSES and s.coarse_labels is None and len(s) == len(ref[split][1])
    # data.root may also name the dataset folder itself
    assert len(load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train=False)) == 6


@pytest.mark.parametrize("bytes_keys,protocol", [(False, 2), (True, 2), (True, 5)])
def test_read_cifar100(tmp_path, bytes_keys, protocol):
    ref = write_cifar100(tmp_path, bytes_keys=bytes_keys, protocol=protocol)
    for train, split in ((True, "train"), (False, "test")):
        s = load_cifar(tmp_path, "cifar100", train=train)
        np.testing.assert_array_equal(s.images, ref[split][0])
        np.testing.assert_array_equal(s.labels, ref[split][1])
        np.testing.assert_array_equal(s.coarse_labels, ref[split][2])
        assert s.labels.dtype == np.int64 and s.coarse_labels.dtype == np.int64
        assert s.classes == FINE and s.coarse_classes == COARSE


def test_cifar10_meta_optional_cifar100_meta_required(tmp_path):
    write_cifar10(tmp_path / "a", meta=False)
    assert load_cifar(tmp_path / "a", "cifar10", train=False).classes == CIFAR10_CLASSES
    write_cifar100(tmp_path / "b", meta=False)
    with pytest.raises(DataError, match=r"meta is missing"):
        load_cifar(tmp_path / "b", "cifar100", train=True)


def test_pickles_written_by_numpy_1_are_read(tmp_path):
    """numpy 1.x wrote its arrays as ``numpy.core.multiarray`` objects (numpy 2 names the module ``numpy._core``):
    such official files are read, through the same allow-list."""
    ref = write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = path.read_bytes()  # protocol 2: module names are newline-terminated text (GLOBAL)
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(load_cifar(tmp_path, "cifar10", train=False).images, ref["test"][0])


def test_pickles_are_read_when_numpy_1_runs(tmp_path, monkeypatch):
    """Under numpy 1.x (no ``numpy._core``) the allowed objects are looked up in ``numpy.core``."""
    import importlib

    ref = write_cifar10(tmp_path)
    real, asked = importlib.import_module, []

    def numpy_1(name, *args):
        asked.append(name)
        if name.startswith("numpy._core"):
            raise ImportError(f"No module named {name!r}")
        return real(name.replace("numpy.core", "numpy._core"), *args)  # numpy 2 serves numpy 1's names here

    monkeypatch.setattr(cifar_mod.importlib, "import_module", numpy_1)
    np.testing.assert_array_equal(load_cifar(tmp_path, "cifar10", train=False).images, ref["test"][0])
    assert "numpy._core.multiarray" in asked and "numpy.core.multiarray" in asked


# --------------------------------------------------------------------------- reader errors


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path / "nowhere", "cifar100", train=True)
    msg = str(e.value)
    url = SPECS["cifar100"].url
    for part in ("cifar-100-python", "train, test, meta", url, "data.download=true", "data.root"):
        assert part in msg
    assert "\n" not in msg


def test_missing_batch_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing.*data_batch_1, data_batch_2"):
        load_cifar(tmp_path, "cifar10", train=True)
    assert len(load_cifar(tmp_path, "cifar10", train=False)) == 6


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_pickle(tmp_path, damage):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    bad = {"truncate": raw[: len(raw) // 2], "garbage": b"\x89PNG not a pickle" * 10, "empty": b""}
    path.write_bytes(bad[damage])
    with pytest.raises(DataError, match=r"data_batch_2 is truncated or corrupt.*data.download=true") as e:
        load_cifar(tmp_path, "cifar10", train=True)
    assert "\n" not in str(e.value)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_foreign_objects_is_refused(tmp_path, capsys):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"test_batch is truncated or corrupt"):
        load_cifar(tmp_path, "cifar10", train=False)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "data,labels,pattern",
    [
        (np.zeros((4, 3000), np.uint8), [0, 1, 2, 3], r"'data' of shape \(4, 3000\).*uint8 N x 3072"),
        (np.zeros((4, 3072), np.float32), [0, 1, 2, 3], r"dtype float32"),
        (np.zeros((4, 3072), np.uint8), [0, 1, 2], r"'labels' of shape \(3,\).*expected 4 integers"),
        (np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], r"values in \[0, 10\], outside \[0, 9\]"),
        (np.zeros((4, 3072), np.uint8), [0, -1, 2, 3], r"outside \[0, 9\]"),
    ],
)
def test_malformed_batch(tmp_path, data, labels, pattern):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"data": data, "labels": labels}, bytes_keys=False, protocol=2)
    with pytest.raises(DataError, match=pattern) as e:
        load_cifar(tmp_path, "cifar10", train=False)
    assert "test_batch" in str(e.value)


def test_missing_key_and_unknown_dataset(tmp_path):
    write_cifar100(tmp_path)
    _dump(
        tmp_path / "cifar-100-python" / "test",
        {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]},
        bytes_keys=True,
        protocol=2,
    )
    with pytest.raises(DataError, match=r"no 'fine_labels' entry"):
        load_cifar(tmp_path, "cifar100", train=False)
    _dump(tmp_path / "cifar-100-python" / "test", {"fine_labels": [0, 1]}, bytes_keys=True, protocol=2)
    with pytest.raises(DataError, match=r"test has no 'data' entry \(keys: fine_labels\).*official cifar-100-python"):
        load_cifar(tmp_path, "cifar100", train=False)
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'; choose one of: cifar10, cifar100"):
        load_cifar(tmp_path, "svhn", train=False)


# --------------------------------------------------------------------------- downloader


def _archive(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    write_cifar10(src)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path, monkeypatch):
    archive, md5 = _archive(tmp_path)
    spec = dataclasses.replace(SPECS["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(SPECS, "cifar10", spec)
    root = tmp_path / "root"
    s = load_cifar(root, "cifar10", train=True, download=True)
    assert s.images.shape == (20, 3, 32, 32)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp files left
    assert download_cifar(root, "cifar10") == root / "cifar-10-batches-py"  # present: no second download


def _tar_with(tmp_path: Path, member: str, *, link: str | None = None) -> Path:
    """A .tar.gz holding cifar-10-batches-py/ plus one more member (a file at ``member``, or a link to ``link``)."""
    path, _ = _archive(tmp_path / "src")
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    out = tmp_path / f"{abs(hash(member))}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        extra = tarfile.TarInfo(member)
        if link is not None:
            extra.type, extra.linkname = tarfile.SYMTYPE, link
            tar.addfile(extra)
        else:
            extra.size = 4
            tar.addfile(extra, io.BytesIO(b"evil"))
    return out


@pytest.mark.parametrize("filtered", [True, False], ids=["data_filter", "older_python"])
def test_unpacking_refuses_members_outside_the_folder(tmp_path, monkeypatch, filtered):
    """Both paths of the unpacking (Python's ``data`` filter, and the member check of Pythons without it) extract
    the official layout and write nothing outside the folder: '..' and links out of it are refused, and so is an
    absolute path (the data filter instead puts it inside)."""
    if not filtered:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter")
    good, _ = _archive(tmp_path / "src")
    cifar_mod._extract(good, tmp_path / "ok")
    assert len(load_cifar(tmp_path / "ok", "cifar10", train=False)) == 6
    outside = tmp_path / "abs-evil"
    cases = [("../evil", None), (str(outside), None), ("cifar-10-batches-py/l", "/etc")]
    for i, (member, link) in enumerate(cases):
        into = tmp_path / f"into{i}"
        into.mkdir()
        try:
            cifar_mod._extract(_tar_with(tmp_path / f"t{i}", member, link=link), into)
            refused = False
        except tarfile.TarError:
            refused = True
        assert refused or (filtered and member.startswith("/")), member
        assert not (tmp_path / "evil").exists() and not outside.exists()
        assert not (into / "cifar-10-batches-py" / "l").is_symlink()


def test_download_bad_checksum(tmp_path, monkeypatch):
    archive, _ = _archive(tmp_path)
    spec = dataclasses.replace(SPECS["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(SPECS, "cifar10", spec)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32}, expected 0{32}.*batches-py/ holds data_batch_1"):
        load_cifar(root, "cifar10", train=True, download=True)
    assert list(root.iterdir()) == []


def test_download_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", offline)
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        load_cifar(root, "cifar100", train=True, download=True)
    msg = str(e.value)
    url = SPECS["cifar100"].url
    for part in (url, "name resolution", "cifar-100-python/ holds train, test, meta", "data.root"):
        assert part in msg
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- device loader

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # normalised x == raw pixel value


def coord_images(n: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """Channel 0 = 100 + row, channel 1 = 100 + column, channel 2 = image index (mod 256)."""
    img = torch.empty(n, 3, h, w, dtype=torch.uint8)
    img[:, 0] = (100 + torch.arange(h)).view(h, 1)
    img[:, 1] = (100 + torch.arange(w)).view(1, w)
    img[:, 2] = (torch.arange(n) % 256).view(n, 1, 1)
    return img


def recover(x: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (dy, dx in [0, 2*pad], crop-then-flip convention) and flips of a batch of coord images."""
    x = x.round().long()
    w = x.shape[-1]
    dy = x[:, 0, pad, pad] - 100
    flipped = x[:, 1, pad, pad + 1] < x[:, 1, pad, pad]
    dx = torch.where(flipped, x[:, 1, pad, w - 1 - pad], x[:, 1, pad, pad]) - 100
    return dy, dx, flipped


def reference_crop(img: torch.Tensor, dy: int, dx: int, flipped: bool, pad: int, mode: str) -> torch.Tensor:
    """torchvision's RandomCrop(padding=pad, padding_mode) then HorizontalFlip, for given draws."""
    f = img.float()[None]
    f = F.pad(f, (pad,) * 4, mode="reflect") if mode == "reflect" else F.pad(f, (pad,) * 4, value=0.0)
    out = f[0, :, dy : dy + img.shape[1], dx : dx + img.shape[2]]
    return out.flip(-1) if flipped else out


def test_crop_offsets_uniform_and_flip_rate():
    n, pad = 4000, 4
    loader = DeviceLoader(
        coord_images(n),
        torch.zeros(n, dtype=torch.long),
        1000,
        train=True,
        pad=pad,
        padding_mode="zeros",
        seed=1,
        **RAW,
    )
    dys, dxs, flips = [], [], []
    for epoch in range(5):
        loader.set_epoch(epoch)
        for x, _ in loader:
            dy, dx, fl = recover(x, pad)
            dys.append(dy), dxs.append(dx), flips.append(fl)
    dy, dx, fl = torch.cat(dys), torch.cat(dxs), torch.cat(flips)
    draws = len(dy)
    assert dy.min() == 0 and dy.max() == 2 * pad and dx.min() == 0 and dx.max() == 2 * pad
    counts = torch.bincount(dy * (2 * pad + 1) + dx, minlength=(2 * pad + 1) ** 2).double()
    expected = draws / (2 * pad + 1) ** 2
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert (counts > 0).all()
    assert chi2 < 80 + 5 * (2 * 80) ** 0.5, chi2  # 80 dof: mean 80, sd 12.6
    rate = fl.double().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / draws) ** 0.5, rate
    # flips independent of the offsets: about half of each column offset is flipped
    for v in range(2 * pad + 1):
        assert abs(fl[dx == v].double().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_matches_reference_and_borders(mode):
    n, pad = 512, 4
    torch.manual_seed(0)
    imgs = coord_images(n)
    imgs[:, 2] = torch.randint(0, 256, (n, 32, 32), dtype=torch.uint8)  # arbitrary content in channel 2
    loader = DeviceLoader(imgs, torch.arange(n), 128, train=True, pad=pad, padding_mode=mode, seed=3, **RAW)
    seen_top = False
    for x, y in loader:
        dy, dx, fl = recover(x, pad)
        for k in range(len(y)):
            ref = reference_crop(imgs[y[k]], int(dy[k]), int(dx[k]), bool(fl[k]), pad, mode)
            torch.testing.assert_close(x[k], ref, atol=1e-3, rtol=0)
            if dy[k] == 0:  # top 4 output rows come from the padding
                seen_top = True
                top = x[k, 0, :pad].round()
                if mode == "zeros":
                    assert (top == 0).all()
                else:  # reflect: output row i is source row pad - i
                    assert (top[:, pad + 1] == 100 + torch.arange(pad, 0, -1)).all()
    assert seen_top


def test_one_pixel_zero_padding_and_single_image_batches():
    img = torch.full((8, 3, 6, 6), 200, dtype=torch.uint8)
    loader = DeviceLoader(img, torch.arange(8), 1, train=True, pad=1, padding_mode="zeros", seed=0, **RAW)
    batches = list(loader)
    assert len(batches) == 8 and all(x.shape == (1, 3, 6, 6) for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    dy, dx = (x[:, 0] == 0).all(2), (x[:, 0] == 0).all(1)  # rows / columns that are all padding
    assert dy.any() or dx.any()  # some crop shifted by one pixel: its border row or column is 0, not 200
    assert set(x.unique().tolist()) == {0.0, 200.0}
    for bad in ({"batch_size": 0}, {"views": 0}, {"pad": -1}):
        args = {"batch_size": 2, "views": 1, "pad": 1} | bad
        with pytest.raises(ValueError, match="positive"):
            DeviceLoader(img, torch.arange(8), args.pop("batch_size"), train=True, **args, **RAW)


def test_zero_padding_is_zero_in_pixel_space():
    img = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = DeviceLoader(
        img, torch.zeros(64, dtype=torch.long), 64, mean=mean, std=std, train=True, pad=2, padding_mode="zeros", seed=0
    )
    x, _ = next(iter(loader))
    values = {round(v, 4) for v in x[:, 0].flatten().tolist()}
    assert values <= {round((0 - 0.5) / 0.2, 4), round((200 / 255 - 0.5) / 0.2, 4)}
    assert len(values) == 2


def test_test_loader_normalises_in_order():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    imgs[:, 0] //= 2  # channels with different statistics
    f = imgs.double() / 255
    mean, std = f.mean((0, 2, 3)).tolist(), f.std((0, 2, 3), unbiased=False).tolist()
    loader = DeviceLoader(imgs, torch.arange(50), 16, mean=mean, std=std, train=False)
    assert len(loader) == 4
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(50))
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ((f - m) / s).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_same_seed_and_epoch_give_identical_batches():
    imgs, labels = coord_images(100), torch.arange(100)
    make = lambda seed: DeviceLoader(imgs, labels, 32, train=True, seed=seed, **RAW)  # noqa: E731
    a, b = make(7), make(7)
    ref = _batches(a, 3)
    for other in (_batches(b, 3), _batches(a, 3)):  # a fresh loader resumed at epoch 3, and a repeat
        assert len(other) == len(ref) == 4
        for (x1, y1), (x2, y2) in zip(ref, other, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(ref[0][1], _batches(a, 4)[0][1])  # another epoch: another order
    assert not torch.equal(ref[0][1], _batches(make(8), 3)[0][1])  # another seed too
    # without set_epoch each pass advances the epoch
    a.set_epoch(5)
    first, second = next(iter(a))[1], next(iter(a))[1]
    assert torch.equal(first, _batches(b, 5)[0][1]) and torch.equal(second, _batches(b, 6)[0][1])
    # every image once per epoch
    assert torch.equal(torch.cat([y for _, y in ref]).sort().values, labels)


def test_drop_last_and_len():
    imgs, labels = coord_images(10), torch.arange(10)
    keep = DeviceLoader(imgs, labels, 4, train=True, **RAW)
    drop = DeviceLoader(imgs, labels, 4, train=True, drop_last=True, **RAW)
    assert len(keep) == 3 and [len(y) for _, y in keep] == [4, 4, 2]
    assert len(drop) == 2 and [len(y) for _, y in drop] == [4, 4] and drop.num_samples == 8
    test = DeviceLoader(imgs, labels, 4, train=False, drop_last=True, **RAW)
    assert len(test) == 2


def test_views_are_independent_draws_of_the_same_images():
    n, pad = 64, 4
    loader = DeviceLoader(coord_images(n), torch.arange(n), 64, train=True, views=3, pad=pad, seed=2, **RAW)
    xs, y = next(iter(loader))
    assert isinstance(xs, list) and len(xs) == 3
    draws = []
    for x in xs:
        assert x.shape == (n, 3, 32, 32)
        assert torch.equal(x[:, 2, pad, pad].round().long(), y)  # same image in every view
        draws.append(torch.stack(recover(x, pad)[:2], 1))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert (draws[0] != draws[1]).any(1).float().mean() > 0.8
    single = DeviceLoader(coord_images(n), torch.arange(n), 64, train=True, seed=2, **RAW)
    assert torch.is_tensor(next(iter(single))[0])


def test_no_flip_no_pad_options_and_channels_last():
    imgs = coord_images(32)
    loader = DeviceLoader(imgs, torch.arange(32), 32, train=True, pad=0, flip=False, channels_last=True, **RAW)
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, imgs[y].float())
    with pytest.raises(ValueError, match="padding_mode"):
        DeviceLoader(imgs, torch.arange(32), 8, train=True, padding_mode="edge", **RAW)


# --------------------------------------------------------------------------- build_loaders


def test_build_loaders_from_config(tmp_path):
    ref = write_cifar10(tmp_path, per_batch=8, n_test=20)
    cfg = DataConfig(
        dataset="cifar10",
        root=str(tmp_path),
        download=False,
        padding_mode="zeros",
        batch_size=8,
        test_batch_size=5,
        limit_train=30,
        limit_test=13,
    )
    train, test, k, names = build_loaders(cfg, seed=4, device="cpu", views=2)
    assert k == 10 and names == CIFAR10_CLASSES
    assert len(train.labels) == 30 and len(train) == 4 and train.padding_mode == "zeros" and train.views == 2
    assert len(test.labels) == 13 and len(test) == 3 and not test.train and test.views == 1
    x = torch.cat([b[0] for b in test])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DATASET_STATS["cifar10"])
    expected = (torch.from_numpy(ref["test"][0][:13]).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b[1] for b in test]), torch.from_numpy(ref["test"][1][:13]))
    xs, y = next(iter(train))
    assert len(xs) == 2 and xs[0].shape == (8, 3, 32, 32)

    cfg = dataclasses.replace(cfg, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], limit_train=None)
    train, test, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert len(train.labels) == 40
    torch.testing.assert_close(train._shift.flatten(), torch.full((3,), -2.0))
    cfg = dataclasses.replace(cfg, drop_last=True, limit_train=5)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loaders(cfg, seed=0, device="cpu")


def test_build_loaders_missing_data(tmp_path):
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path / "data"), download=False)
    with pytest.raises(DataError, match=r"cifar-100-python.*data.download=true"):
        build_loaders(cfg, seed=0, device="cpu")


# --------------------------------------------------------------------------- real data (../shared/data)


def test_real_cifar10_subset(cifar10_root):
    s = load_cifar(cifar10_root, "cifar10", train=True)
    assert s.images.shape == (2000, 3, 32, 32) and s.classes == CIFAR10_CLASSES
    assert (np.bincount(s.labels, minlength=10) == 200).all()
    cfg = DataConfig(dataset="cifar10", root=str(cifar10_root), download=False)
    train, test, k, names = build_loaders(cfg, seed=0, device="cpu")
    assert k == 10 and len(train.labels) == 2000 and len(test.labels) == 500
    assert (torch.bincount(test.labels, minlength=10) == 50).all()
    xb, yb = next(iter(train))
    assert xb.shape == (128, 3, 32, 32) and yb.dtype == torch.int64


def _pickled_images(folder: Path, names: list[str]) -> np.ndarray:
    """uint8 N x 3 x 32 x 32 read straight from the official pickles (independently of okd's reader)."""
    batches = []
    for name in names:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        batches.append(np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8))
    return np.concatenate(batches).reshape(-1, 3, 32, 32)


def test_cifar10_normalisation_matches_the_data(cifar10_root):
    """The mean/std the default CIFAR-10 loader normalises with are those of the training images (within 0.01)."""
    folder = cifar10_root / "cifar-10-batches-py"
    pixels = _pickled_images(folder, [f"data_batch_{i}" for i in range(1, 6)]) / 255.0
    data_mean, data_std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))
    raw_test = torch.from_numpy(_pickled_images(folder, ["test_batch"])).double() / 255.0
    _, test, _, _ = build_loaders(DataConfig(dataset="cifar10", root=str(cifar10_root), download=False), 0, "cpu")
    x = torch.cat([b[0] for b in test]).double()
    assert x.shape == raw_test.shape
    # x = (p - mean) / std per channel: recover the loader's mean and std from two pixel levels' fit
    for c in range(3):
        p, v = raw_test[:, c].flatten(), x[:, c].flatten()
        slope = ((p - p.mean()) * (v - v.mean())).sum() / ((p - p.mean()) ** 2).sum()
        std = 1.0 / slope.item()
        mean = (p.mean() - v.mean() * std).item()
        assert abs(mean - data_mean[c]) < 0.01, (c, mean, data_mean[c])
        assert abs(std - data_std[c]) < 0.01, (c, std, data_std[c])


def test_normalisation_constants_are_the_documented_ones():
    """DATASET_STATS and the ImageNet constants are those of docs/models.md#data-side-constants, digit for digit."""
    import re

    from okd.data.facts import IMAGENET_MEAN, IMAGENET_STD

    text = " ".join((Path(__file__).parents[2] / "docs" / "models.md").read_text().split())
    section = text.split("## Data-side constants", 1)[1].split("##", 1)[0]

    def documented(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        found = re.search(re.escape(name) + r" mean \(([^)]*)\), std \(([^)]*)\)", section)
        return tuple(tuple(float(v) for v in group.split(",")) for group in found.groups())

    assert DATASET_STATS["cifar10"] == documented("CIFAR-10")
    assert DATASET_STATS["cifar100"] == documented("CIFAR-100")
    assert (IMAGENET_MEAN, IMAGENET_STD) == documented("default for folder data)")


def test_cifar100_loader_normalises_with_the_cifar100_statistics(tmp_path):
    ref = write_cifar100(tmp_path)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path), download=False, test_batch_size=5)
    _, test, k, _ = build_loaders(cfg, seed=0, device="cpu")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DATASET_STATS["cifar100"])
    expected = (torch.from_numpy(ref["test"][0]).float() / 255 - mean) / std
    assert k == 100
    torch.testing.assert_close(torch.cat([b[0] for b in test]), expected, atol=1e-5, rtol=1e-5)


def test_reflect_padding_is_the_default():
    assert DataConfig().padding_mode == "reflect" and DataConfig().pad == 4
    n = 512
    loader = DeviceLoader(coord_images(n), torch.arange(n), n, train=True, seed=1, **RAW)  # no padding_mode given
    x, _ = next(iter(loader))
    dy, _, _ = recover(x, 4)
    assert set(dy.tolist()) == set(range(9))  # pad 4: offsets 0..8
    top = x[dy == 0][:, 0, :4].round()  # rows from the padding: reflected source rows 4, 3, 2, 1
    assert (top == (100 + torch.arange(4, 0, -1)).view(1, 4, 1)).all()


def test_default_config_builds_reflect_padded_training_batches(tmp_path):
    write_cifar10(tmp_path, per_batch=8, n_test=4)
    train, _, _, _ = build_loaders(DataConfig(dataset="cifar10", root=str(tmp_path), download=False), 0, "cpu")
    assert train.train and train.padding_mode == "reflect" and train.pad == 4


def test_holdout_is_the_last_images_in_order_and_unaugmented():
    from okd.data.device_loader import split_holdout

    n = 40
    imgs = coord_images(n)
    loader = DeviceLoader(imgs, torch.arange(n), 16, train=True, views=3, drop_last=True, seed=2, **RAW)
    train, held = split_holdout(loader, 12)
    assert torch.equal(train.labels, torch.arange(28)) and train.train and train.views == 3
    assert torch.equal(train.images, imgs[:28]) and torch.equal(held.images, imgs[28:])
    for epoch in (0, 5):
        held.set_epoch(epoch)
        batches = list(held)
        assert [len(y) for _, y in batches] == [12]  # no drop_last on the held-out split
        x, y = batches[0]
        assert isinstance(x, torch.Tensor)  # one view
        assert torch.equal(y, torch.arange(28, 40))  # in order
        torch.testing.assert_close(x, imgs[28:].float())  # no crop, no flip: the pixels themselves
    assert loader.train and loader.views == 3 and len(loader.labels) == n  # the original is untouched
    for bad in (0, n):  # nothing held out, or nothing left to train on
        with pytest.raises(ValueError, match="holdout"):
            split_holdout(loader, bad)
    assert len(split_holdout(loader, n - 1)[0].labels) == 1


@pytest.mark.parametrize(
    ("images", "labels", "kw", "says"),
    [
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
            torch.arange(3),
            {},
            r"labels shape \(3,\) does not match 4 images",
        ),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, 1), {}, r"labels shape \(4, 1\) does not match"),
        (torch.zeros(4, 3, 8, 8), torch.arange(4), {}, "images must be uint8 N x C x H x W"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.arange(3), {}, "images must be uint8 N x C x H x W"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"pad": 8}, "reflect padding needs pad < image"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"pad": -1}, "pad non-negative"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"views": 0}, "views must be positive"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"mean": (0.5,)}, "mean and std need 3 values"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"std": (1.0,) * 4}, "mean and std need 3"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"m_per_class": -1}, "m_per_class=-1 needs"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"m_per_class": 3}, "must divide batch_size"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), {"m_per_class": 2, "train": False}, "training"),
    ],
)
def test_device_loader_refuses_inconsistent_inputs(images, labels, kw, says):
    args = {**RAW, "train": True, **kw}
    with pytest.raises(ValueError, match=says):
        DeviceLoader(images, labels, 2, **args)


def test_device_loader_accepts_its_edges_and_checks_the_shard():
    loader = DeviceLoader(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), 4, train=True, pad=7, **RAW)
    assert len(loader) == 1
    loader.shard(1, 2)
    for rank, world in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match=f"rank {rank} outside world of size {world}"):
            loader.shard(rank, world)


def test_build_loaders_refuses_a_zero_std_given_directly(tmp_path):
    """A DataConfig built in code skips the config checks; the loader still refuses a std of 0 (a division by 0)."""
    write_cifar10(tmp_path)
    for std in ([0.2, 0.0, 0.2], [0.2, -0.1, 0.2]):
        cfg = DataConfig(dataset="cifar10", root=str(tmp_path), download=False, std=std)
        with pytest.raises(DataError, match=r"data.std must be positive, got \[0.2, -?0.(0|1), 0.2\]"):
            build_loaders(cfg, seed=0, device="cpu")


# --------------------------------------------------------------------------- m-per-class sampler (MCL)
def _balanced_batches(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_m_per_class_order_draws_independent_class_balanced_batches():
    labels = torch.arange(200) % 20  # 20 classes x 10 images
    gen = torch.Generator().manual_seed(0)
    order = m_per_class_order(labels, 2, 16, 12, gen)
    assert order.shape == (12 * 16,)
    for batch in order.view(12, 8, 2):  # 8 classes x 2 images, laid out class by class
        cls = labels[batch]
        assert torch.equal(cls[:, 0], cls[:, 1]), "each pair is one class"
        assert len(cls[:, 0].unique()) == 8, "8 distinct classes per batch"
        assert bool((batch[:, 0] != batch[:, 1]).all()), "two distinct images of each class"
    assert len(order.unique()) < len(order), "independent batches: a pass repeats images (not a permutation)"
    few = torch.tensor([0, 1, 1, 1, 2, 2, 2])  # class 0 has one image: drawn with replacement
    picks = m_per_class_order(few, 2, 6, 5, torch.Generator().manual_seed(1)).view(5, 3, 2)
    assert torch.equal(few[picks[:, :, 0]], few[picks[:, :, 1]])
    with pytest.raises(ValueError, match="needs 4 classes, the split has 3"):
        m_per_class_order(few, 2, 8, 1, gen)


def test_m_per_class_draws_are_uniform_over_distinct_pairs_and_classes():
    """A class of 3 images gives each of its 6 ordered pairs 1/6 of the time; each of 5 classes is in a batch of
    2 classes 2/5 of the time (6000 batches: a 5-sigma band)."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    order = m_per_class_order(labels, 2, 4, 6000, torch.Generator().manual_seed(2)).view(-1, 2)
    pairs = order[labels[order[:, 0]] == 0]
    counts = torch.tensor(
        [int(((pairs[:, 0] == a) & (pairs[:, 1] == b)).sum()) for a in range(3) for b in range(3) if a != b]
    )
    n = len(pairs)
    assert n == pytest.approx(6000 * 2 / 5, abs=5 * math.sqrt(6000 * 0.4 * 0.6))
    assert bool((counts - n / 6).abs().max() < 5 * math.sqrt(n / 6 * 5 / 6)), counts


def test_m_per_class_loader_length_resume_and_labels():
    imgs, labels = coord_images(100), torch.arange(100) % 10
    make = lambda: DeviceLoader(imgs, labels, 8, train=True, seed=3, m_per_class=2, **RAW)  # noqa: E731
    a = make()
    assert len(a) == 12, "len(split) // batch_size batches, no partial batch"
    ref = _balanced_batches(a, 4)
    again = _balanced_batches(make(), 4)  # a fresh loader set to epoch 4: bitwise the same batches (resume)
    for (x1, y1), (x2, y2) in zip(ref, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for x, y in ref:
        assert torch.equal(y[0::2], y[1::2]) and len(y.unique()) == 4
        ids = x[:, 2, 0, 0].round().long()  # channel 2 of a coord image is its index: the image matches its label
        assert torch.equal(labels[ids], y)
    assert not torch.equal(torch.cat([y for _, y in ref]), torch.cat([y for _, y in _balanced_batches(a, 5)]))


def test_m_per_class_shards_keep_whole_classes():
    imgs, labels = coord_images(64), torch.arange(64) % 8
    full = DeviceLoader(imgs, labels, 16, train=True, seed=1, m_per_class=2, **RAW)
    parts = []
    for rank in range(2):
        shard = DeviceLoader(imgs, labels, 16, train=True, seed=1, m_per_class=2, **RAW)
        shard.shard(rank, 2)
        parts.append(_balanced_batches(shard, 0))
    for (x, y), (x0, y0), (x1, y1) in zip(_balanced_batches(full, 0), *parts, strict=True):
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(y0[0::2], y0[1::2]), "every class of a shard keeps both its images"
    with pytest.raises(DataError, match="multiple of world size x data.m_per_class"):
        DeviceLoader(imgs, labels, 12, train=True, m_per_class=2, **RAW).shard(0, 4)


def test_m_per_class_from_config_and_its_refusals(tmp_path):
    write_cifar10(tmp_path, per_batch=20)
    cfg = DataConfig(
        dataset="cifar10", root=str(tmp_path), download=False, batch_size=8, sampler="m_per_class", holdout=0
    )
    train, test, _, _ = build_loaders(cfg, seed=0, device="cpu")
    assert train.m_per_class == 2 and test.m_per_class == 0 and len(train) == 100 // 8
    _, y = next(iter(train))
    assert torch.equal(y[0::2], y[1::2])
    with pytest.raises(DataError, match="12 classes per batch, but the training split has 10"):
        build_loaders(dataclasses.replace(cfg, batch_size=24), seed=0, device="cpu")
    held_train, held = split_holdout(train, 10)
    assert held.m_per_class == 0 and len(held) == 10 // 8 + 1 and held_train.m_per_class == 2


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["data.sampler=m_per_class", "data.m_per_class=3"], "must be >= 1 and divide data.batch_size"),
        (["data.sampler=m_per_class", "data.dataset=imagenet"], "CIFAR loaders only"),
        (["data.sampler=balanced"], "data.sampler='balanced' is not valid"),
    ],
)
def test_m_per_class_config_checks(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)
    assert "sampler" not in load_config(None, []).to_dict()["data"], "the default is stored as before"
    assert load_config(None, ["data.sampler=m_per_class"]).to_dict()["data"]["m_per_class"] == 2


def _spec_serving(monkeypatch, archive: Path) -> None:
    spec = dataclasses.replace(
        SPECS["cifar10"], url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(SPECS, "cifar10", spec)


def test_a_download_that_is_not_an_archive_or_lacks_a_file_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """An archive that cannot be unpacked, or that lacks one of the official files, is an okd error naming what
    went wrong; the data root is left as it was (no partial folder, no temporary files)."""
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar archive at all")
    _spec_serving(monkeypatch, junk)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"cannot unpack the cifar10 archive from file://.*junk.tar.gz: "):
        download_cifar(root, "cifar10")
    assert list(root.iterdir()) == []
    src = tmp_path / "src"
    write_cifar10(src)
    (src / "cifar-10-batches-py" / "data_batch_4").unlink()
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _spec_serving(monkeypatch, partial)
    with pytest.raises(DataError, match=r"does not hold the expected layout .*\(missing: data_batch_4\)"):
        download_cifar(root, "cifar10")
    assert list(root.iterdir()) == []


def test_an_archive_without_cifar10s_optional_meta_file_is_accepted(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src, meta=False)
    archive = tmp_path / "no-meta.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _spec_serving(monkeypatch, archive)
    assert download_cifar(tmp_path / "root", "cifar10") == tmp_path / "root" / "cifar-10-batches-py"


def test_a_data_root_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"cannot create data.root .*a-file/sub to download cifar10 into: "):
        download_cifar(blocker / "sub", "cifar10")


def test_a_folder_another_process_finished_first_is_kept(tmp_path, monkeypatch):
    """Two processes downloading at once: the second rename finds the folder already in place and keeps it."""
    archive, _ = _archive(tmp_path)
    _spec_serving(monkeypatch, archive)
    root = tmp_path / "root"
    real_replace = os.replace

    def raced(src, dst):
        real_replace(src, dst)  # the other process got there first
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(cifar_mod.os, "replace", raced)
    assert download_cifar(root, "cifar10") == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    monkeypatch.setattr(cifar_mod.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError, match="No space"):
        download_cifar(tmp_path / "other", "cifar10")


def test_a_pickle_that_is_not_a_dict_or_has_the_wrong_class_names_is_refused(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match=r"test_batch does not hold a dict of arrays \(got list\)"):
        load_cifar(tmp_path, "cifar10", train=False)
    write_cifar10(tmp_path / "names")
    meta = tmp_path / "names" / "cifar-10-batches-py" / "batches.meta"
    _dump(meta, {"label_names": CIFAR10_CLASSES[:9]}, bytes_keys=False, protocol=2)
    with pytest.raises(DataError, match=r"should list 10 class names under 'label_names'; got 9"):
        load_cifar(tmp_path / "names", "cifar10", train=False)


def test_python_2_module_names_in_a_pickle_map_to_their_python_3_objects():
    """Official files written by Python 2 name ``copy_reg`` and ``__builtin__``; the allow-list maps them."""
    unpickler = cifar_mod._SafeUnpickler(io.BytesIO(b""), encoding="latin1")
    assert unpickler.find_class("copy_reg", "_reconstructor") is copyreg._reconstructor
    assert unpickler.find_class("__builtin__", "object") is object
    with pytest.raises(pickle.UnpicklingError, match="unexpected object __builtin__.eval"):
        unpickler.find_class("__builtin__", "eval")
