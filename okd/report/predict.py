"""``okd predict``: the top classes of image files under a run's deployable network or an exported file.

The model is a run folder, a ``deploy.pt`` / exported state_dict, an exported TorchScript file or an ONNX
file (``okd export``); its preprocessing (input size, resize or shorter side + centre crop, mean/std) and
class names come with it. :meth:`Predictor.describe` says which model, head and preprocessing were used.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from okd.data.facts import default_class_names, input_geometry, normalization
from okd.errors import CheckpointError, OKDError
from okd.extras import require
from okd.report.export import _no_jit_deprecation, load_deployable


def _numbers(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass
class Predictor:
    """A loaded model: ``logits(x)`` on normalised N x 3 x size x size inputs, its preprocessing and identity."""

    logits: Callable[[Tensor], np.ndarray]
    classes: list[str]
    mean: list[float]
    std: list[float]
    size: int = 32
    resize: int | None = None
    source: str = ""
    kind: str = ""  # okd deploy file, TorchScript, ONNX
    model: str | None = None
    method: str | None = None
    head: str | None = None
    epoch: int | None = None
    dataset: str | None = None

    def preprocessing(self) -> str:
        """The image pipeline in words: geometry, scaling and normalisation."""
        if self.resize is not None:
            geometry = f"shorter side to {self.resize} (bilinear), centre crop {self.size}x{self.size}"
        else:
            geometry = f"resize to {self.size}x{self.size} (bicubic; kept when already that size)"
        return f"RGB, {geometry}, /255, normalised with mean {_numbers(self.mean)} std {_numbers(self.std)}"

    def describe(self) -> list[str]:
        """``model: ...`` and ``preprocessing: ...`` lines for the user."""
        what = self.model or "unknown backbone"
        parts = [f"{len(self.classes)} classes" if self.classes else None, self.dataset]
        details = ", ".join(p for p in parts if p)
        head = f"head {self.head}" if self.head else "head not recorded"
        origin = f" of {self.method}" if self.method else ""
        epoch = f", epoch {self.epoch}" if self.epoch is not None else ""
        return [
            f"model: {what}{f' ({details})' if details else ''}, {head}{origin}{epoch}; {self.kind} {self.source}",
            f"preprocessing: {self.preprocessing()}",
        ]


def load_predictor(path: str | Path) -> Predictor:
    """A run folder, a deploy.pt / exported state_dict, an exported TorchScript file or an ONNX file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        ort = require("onnxruntime", "onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map.get("okd", "{}"))
        name = session.get_inputs()[0].name
        return _predictor(lambda x: session.run(None, {name: x.numpy()})[0], meta, str(path), "ONNX")
    if path.is_file() and _is_torchscript(path):
        extra = {"okd.json": ""}
        try:
            with _no_jit_deprecation():
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise CheckpointError(f"{path} is a TorchScript archive that cannot be loaded: {exc}") from None
        if module is not None:
            meta = json.loads(extra["okd.json"] or "{}")
            module.eval()
            return _predictor(lambda x: module(x).detach().numpy(), meta, str(path), "TorchScript")
    dep = load_deployable(path, check=False)
    return _predictor(lambda x: dep.net(x).detach().numpy(), dep.metadata(), dep.source or str(path), "okd file")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip with ``code/`` and ``constants.pkl``), as ``okd export`` writes; any other
    file (deploy.pt, a state_dict) is read as data only, with ``weights_only=True``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _predictor(fn: Callable[[Tensor], np.ndarray], meta: dict, source: str, kind: str) -> Predictor:
    def logits(x: Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(fn(x))

    classes = list(meta.get("classes") or [])
    mean, std = normalization(meta, meta.get("dataset"))
    size, resize = input_geometry(meta.get("dataset"))
    return Predictor(
        logits,
        classes,
        mean,
        std,
        int(meta.get("size") or size),
        meta.get("resize", resize),
        source=source,
        kind=kind,
        model=meta.get("model"),
        method=meta.get("method"),
        head=meta.get("head"),
        epoch=meta.get("epoch"),
        dataset=meta.get("dataset"),
    )


def _read_image(image_mod, path: str | Path, size: int, resize: int | None) -> np.ndarray:
    """One image file as float32 3 x size x size, RGB (see :func:`load_images`)."""
    with image_mod.open(path) as im:
        im = im.convert("RGB")
        if resize is not None:
            w, h = im.size
            scale = resize / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), image_mod.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
        elif im.size != (size, size):
            im = im.resize((size, size), image_mod.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1)


def read_images(
    paths: list[str | Path], size: int = 32, resize: int | None = None
) -> tuple[Tensor | None, list[int], list[tuple[str, str]]]:
    """The readable image files among ``paths`` as in :func:`load_images`: ``(batch or None, their positions in
    paths, [(path, reason)] of the files that cannot be read)``."""
    image_mod = require("PIL.Image", "images")
    batch, kept, unreadable = [], [], []
    for i, p in enumerate(paths):
        try:
            batch.append(_read_image(image_mod, p, size, resize))
            kept.append(i)
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            unreadable.append((str(p), f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__))
    return (torch.from_numpy(np.stack(batch)) if batch else None), kept, unreadable


def load_images(paths: list[str | Path], size: int = 32, resize: int | None = None) -> Tensor:
    """Image files as uint8-scale float N x 3 x size x size, RGB: resized to size x size (bicubic), or with
    ``resize``, shorter side to ``resize`` then the centre ``size`` x ``size`` crop (ImageNet's test recipe).
    An unreadable file is an ``OKDError`` naming it."""
    x, _, unreadable = read_images(paths, size, resize)
    if unreadable:
        path, reason = unreadable[0]
        raise OKDError(f"cannot read image {path!r}: {reason}")
    return x


def _top_classes(pred: Predictor, x: Tensor, top: int) -> list[list[tuple[str, float]]]:
    x = x / 255.0
    x = (x - torch.tensor(pred.mean).view(1, 3, 1, 1)) / torch.tensor(pred.std).view(1, 3, 1, 1)
    logits = torch.from_numpy(pred.logits(x.float())).double()
    probs = torch.softmax(logits, dim=1)
    classes = pred.classes if len(pred.classes) == probs.shape[1] else default_class_names(probs.shape[1])
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values, indices.tolist(), strict=True)
    ]


def predict_with(pred: Predictor, images: list[str | Path], top: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``top`` (class name, probability) for each image file under a loaded :class:`Predictor` (an
    unreadable file is an ``OKDError``; :func:`predict_readable` predicts the rest instead)."""
    return _top_classes(pred, load_images(images, pred.size, pred.resize), top)


def predict_readable(
    pred: Predictor, images: list[str | Path], top: int = 5
) -> tuple[list[list[tuple[str, float]] | None], list[tuple[str, str]]]:
    """Top-``top`` classes of every readable image (None in its place for an unreadable one), and the unreadable
    files with the reason, so one bad file in a folder does not stop the others (``okd predict``)."""
    x, kept, unreadable = read_images(images, pred.size, pred.resize)
    results: list[list[tuple[str, float]] | None] = [None] * len(images)
    if x is not None:
        for i, r in zip(kept, _top_classes(pred, x, top), strict=True):
            results[i] = r
    return results, unreadable


def predict(model: str | Path, images: list[str | Path], top: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``top`` (class name, probability) for each image file."""
    return predict_with(load_predictor(model), images, top)
