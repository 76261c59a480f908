"""``okd export``: the deployable network alone, in a file a user can serve (``okd predict`` reads it back).

``okd export RUN_DIR --format state_dict|safetensors|torchscript|onnx`` writes the network a method deploys
(FFSD's leader without its decoder, ONE's branch as a plain backbone, ...), read from ``deploy.pt`` (or rebuilt from
``last.pt``/``best.pt``), and checks the round trip: the written file, loaded back, gives the same logits on a
fixed batch (state_dict, safetensors and TorchScript to 1e-5; ONNX with onnxruntime, when installed, to 1e-4). When the
run's ``last.pt`` is there, the network is also checked against the method's own deployed head, i.e. the
logits the run was scored with. The network takes normalised 32x32 images; the input mean/std, the class
names and the backbone travel with the file (state_dict: keys of the dict; safetensors: the JSON metadata
entry ``okd``, naming model, method, head, num_classes and epoch; TorchScript: the extra file ``okd.json``;
ONNX: metadata ``okd``). safetensors (the ``safetensors`` extra) is the pickle-free format for sharing the
weights; TorchScript is deprecated in recent PyTorch (still working in 2.13), and, being code, is only
loaded by ``okd predict`` when it is a TorchScript archive; ONNX is the format to prefer for serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from okd.data.cifar import SPECS
from okd.data.facts import class_names, input_geometry, normalization
from okd.errors import CheckpointError, OKDError
from okd.extras import require
from okd.io import atomic_save, atomic_write_bytes, load_checkpoint
from okd.methods.build import method_class
from okd.methods.cohort import deployed_spec
from okd.models.deploy_file import (
    DEPLOY_FORMAT,
    build_network,
    check_class_count,
    read_deploy,
    safetensors_metadata,
)
from okd.models.spec import model_spec
from okd.runs.reader import Run, deploy_head_of, load_run_method, read_run_config
from okd.runs.records import deploy_record

FORMATS = ("state_dict", "safetensors", "torchscript", "onnx")
SUFFIX = {
    "state_dict": "_state_dict.pt",
    "safetensors": ".safetensors",
    "torchscript": "_torchscript.pt",
    "onnx": ".onnx",
}
TOLERANCE = {"state_dict": 1e-5, "safetensors": 1e-5, "torchscript": 1e-5, "onnx": 1e-4}
ONNX_INLINE_LIMIT = 1 << 30  # weight bytes an ONNX file holds inline (protobuf caps a file at 2 GiB)


@dataclass
class Deployable:
    """The deployable network of a run (eval mode, CPU) and what a user needs to feed it."""

    net: nn.Module
    model: str
    num_classes: int
    method: str | None = None
    epoch: int | None = None
    dataset: str | None = None
    head: str | None = None  # the method's eval head this network is (FFSD: leader); None when unknown
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    source: str = ""
    size: int = 32  # input height = width
    resize: int | None = None  # shorter side before the centre crop (None: plain resize to size x size)
    #: the method's deployed head as scored in training (when its checkpoint was at hand)
    training_head: Callable[[Tensor], Tensor] | None = None
    #: how to rebuild ``net`` (okd.models.spec.model_spec); None: a registered backbone with defaults
    spec: dict | None = None

    def metadata(self) -> dict:
        return {
            **({"model_spec": self.spec} if self.spec is not None else {}),
            "model": self.model,
            "num_classes": self.num_classes,
            "method": self.method,
            "epoch": self.epoch,
            "dataset": self.dataset,
            "head": self.head,
            "classes": self.classes,
            "mean": self.mean,
            "std": self.std,
            "size": self.size,
            "resize": self.resize,
            "input": f"float32 N x 3 x {self.size} x {self.size}, (RGB/255 - mean) / std",
        }


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None  # exported vs PyTorch logits; None: not checked (onnxruntime missing)
    training_diff: float | None  # deployable vs the method's deployed head; None: no run checkpoint
    checked_with: str


def _finish(net: nn.Module, cfg_dict: dict | None, dataset: str | None = None, **kw) -> Deployable:
    """A :class:`Deployable` with the preprocessing and class names of the run config (when known)."""
    data = (cfg_dict or {}).get("data") or {}
    dataset = data.get("dataset") or dataset
    mean, std = normalization(data, dataset)
    classes = class_names(dataset, data.get("root"), kw["num_classes"])
    size, resize = input_geometry(dataset, data)
    return Deployable(
        net=net.eval().cpu(), dataset=dataset, classes=classes, mean=mean, std=std, size=size, resize=resize, **kw
    )


def _training_head(method) -> Callable[[Tensor], Tensor] | None:
    """The method's deployed head as scored in training (what the exported network must reproduce)."""
    head = getattr(method, "deploy_head", None)
    if head is None:
        return None
    return lambda x: method.eval_outputs(x)[head]


def _from_deploy_file(path: Path, cfg: dict | None) -> Deployable:
    return _from_deploy_record(read_deploy(path), str(path), path.parent, cfg)


def _from_deploy_record(ckpt: dict, path: str, folder: Path, cfg: dict | None) -> Deployable:
    dataset = ((cfg or {}).get("data") or {}).get("dataset") or ckpt.get("dataset")
    if dataset in SPECS:  # a 100-class network where 10 classes are expected, or the reverse
        where = f"the run's data set ({dataset})" if cfg else f"its data set ({dataset})"
        check_class_count(ckpt["num_classes"], SPECS[dataset].num_classes, path, where)
    net = build_network(ckpt, path)
    dep = _finish(
        net,
        cfg,
        model=ckpt["model"],
        num_classes=int(ckpt["num_classes"]),
        method=ckpt.get("method"),
        epoch=ckpt.get("epoch"),
        dataset=ckpt.get("dataset"),
        source=path,
    )
    dep.spec = ckpt["model_spec"] if isinstance(ckpt.get("model_spec"), dict) else None
    dep.classes = list(ckpt.get("classes") or dep.classes)
    dep.mean, dep.std = list(ckpt.get("mean") or dep.mean), list(ckpt.get("std") or dep.std)
    dep.size, dep.resize = int(ckpt.get("size") or dep.size), ckpt.get("resize", dep.resize)
    dep.head = ckpt.get("head") or (deploy_head_of(folder, cfg) if cfg is not None else None)
    if dep.head is None and dep.method:
        dep.head = getattr(method_class(dep.method), "deploy_head", None)  # a head its params do not change
    return dep


def _from_run_method(method, cfg, epoch: int | None, source: str) -> Deployable:
    """The deployable network of a method rebuilt by ``load_run_method`` from the checkpoint ``source`` (of a
    cohort given by members: the member the method deploys)."""
    spec = deployed_spec(cfg, method) or model_spec(cfg)
    dep = _finish(
        method.deployable(),
        cfg.to_dict(),
        model=spec["name"],
        num_classes=int(method.ctx.num_classes),
        method=cfg.method_name,
        epoch=epoch,
        head=method.deploy_head,
        source=source,
    )
    dep.spec = spec
    return dep


def _rebuild_fields(record: dict) -> dict:
    """What a deploy record holds beyond the network (preprocessing, class names), to rebuild it for another
    member: everything but the header, the weights and the network's description."""
    skip = {"format", "model", "method", "num_classes", "epoch", "state_dict", "model_spec", "head"}
    return {k: v for k, v in record.items() if k not in skip}


def load_deployable(path: str | Path, which: str = "last", overrides: list[str] = (), check: bool = True) -> Deployable:
    """The deployable network of a run folder as its last.pt commits it (the committed deploy record for
    ``last``; best.pt's method for ``best``), a deploy.pt or exported file, or a run checkpoint file outside a
    run folder. With ``check``, keeps the method's deployed head to compare with."""
    path = Path(path)
    if path.is_dir() or (path.name in ("last.pt", "best.pt", "deploy.pt") and (path.parent / "last.pt").exists()):
        run = Run(path)
        which = {"last.pt": "last", "best.pt": "best", "deploy.pt": "last"}.get(path.name, which)
        method = None
        if which == "last":
            record, source = run.deploy_record()
            if overrides:  # e.g. method.deploy_net=1: the committed epoch's network that the overrides deploy
                method, cfg, _ = load_run_method(run.dir, "last", overrides)
                record = deploy_record(cfg, method, run.epoch, rebuild=_rebuild_fields(record))
                record["head"], source = method.deploy_head, f"{run.dir / 'last.pt'} ({' '.join(overrides)})"
            dep = _from_deploy_record(record, source, run.dir, run.config_dict)
        else:
            method, cfg, source = load_run_method(run.dir, which, overrides)
            dep = _from_run_method(method, cfg, run.checkpoint(which)[0].get("epoch"), source)
        if check:
            dep.training_head = _training_head(method or load_run_method(run.dir, which, overrides)[0])
        return dep
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run folder, a deploy.pt or an exported file")
    if path.name in ("best.pt", "deploy.pt") and (path.parent / "config.yaml").is_file():
        Run(path.parent)  # refuses: a run folder's results with no committed epoch
    cfg = read_run_config(path.parent) if (path.parent / "config.yaml").is_file() else None
    if path.suffix == ".safetensors":
        return _from_deploy_file(path, cfg)
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == DEPLOY_FORMAT:
        return _from_deploy_file(path, cfg)
    if "config" in ckpt and "method" in ckpt:
        method, c, _ = load_run_method(path, overrides=overrides)
        dep = _from_run_method(method, c, ckpt.get("epoch"), str(path))
        if check:
            dep.training_head = _training_head(method)
        return dep
    raise CheckpointError(f"{path} is neither a deploy.pt nor an okd run checkpoint")


def export_stem(model: str) -> str:
    """The file-name stem of an export of ``model``: every character other than a letter, digit, ``.``, ``_``
    or ``-`` becomes ``-`` (``my_cnn:build`` -> ``my_cnn-build``, ``timm:resnet18`` -> ``timm-resnet18``), so
    the name survives scp, Windows and network shares; registered names are unchanged."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", model) or "model"


def sample_inputs(n: int = 8, seed: int = 0, size: int = 32) -> Tensor:
    """A fixed batch of normalised-scale inputs for the round-trip checks."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _close(a, b, tol: float) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol))


@contextlib.contextmanager
def _no_jit_deprecation():
    """TorchScript still works in torch 2.13 but warns on every save/load; say it once, in the docs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


@contextlib.contextmanager
def _quiet():
    """Silence the ONNX exporter's warnings and progress logs."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(None):
                yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _export_onnx(net: nn.Module, x: Tensor, out: Path, meta: dict) -> None:
    require("onnx", "onnx")
    kwargs = {"input_names": ["images"], "output_names": ["logits"]}
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter, the default since torch 2.9)

        dynamo = True
    except ImportError:
        dynamo = False
    # one self-contained file (no "<out>.data" beside it) unless the weights pass protobuf's 2 GiB limit
    external = sum(t.numel() * t.element_size() for t in net.state_dict().values()) > ONNX_INLINE_LIMIT
    data = out.with_name(out.name + ".data")
    with _quiet():
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                net, (x,), str(out), dynamo=True, dynamic_shapes=({0: batch},), external_data=external, **kwargs
            )
        else:
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(net, (x,), str(out), dynamo=False, dynamic_axes=axes, **kwargs)
    import onnx

    model = onnx.load(str(out))
    model.metadata_props.add(key="okd", value=json.dumps(meta))
    if external:
        onnx.save(model, str(out), save_as_external_data=True, location=data.name)
    else:
        onnx.save(model, str(out))
        data.unlink(missing_ok=True)  # a stale weights file of an earlier export to the same path


def onnx_logits(path: str | Path, x: Tensor) -> np.ndarray | None:
    """Logits of an ONNX file under onnxruntime, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.numpy()})[0]


def export(
    path: str | Path, fmt: str, out: str | Path | None = None, which: str = "last", overrides: list[str] = ()
) -> ExportResult:
    """Write the deployable network of ``path`` as ``fmt`` and check the round trip (raises on a mismatch)."""
    if fmt not in FORMATS:
        raise OKDError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    dep = load_deployable(path, which, overrides)
    path = Path(path)
    if out is None:
        folder = path if path.is_dir() else path.parent
        out = folder / "export" / f"{export_stem(dep.model)}{SUFFIX[fmt]}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = sample_inputs(size=dep.size)
    with torch.no_grad():
        ref = dep.net(x)
        training_diff = None
        if dep.training_head is not None:
            head = dep.training_head(x)
            check_class_count(ref.shape[1], head.shape[1], dep.source, "the run's checkpoint (last.pt/best.pt)")
            training_diff = _max_diff(head, ref)
            if not _close(head, ref, 1e-5):
                raise CheckpointError(
                    f"the deployable network of {path} disagrees with the method's deployed head "
                    f"(max |diff| {training_diff:.3g}); deploy.pt and the checkpoint do not match"
                )
    meta = dep.metadata()
    checked = "PyTorch"
    if fmt == "state_dict":
        state = {k: v.detach().cpu() for k, v in dep.net.state_dict().items()}
        atomic_save({"format": DEPLOY_FORMAT, **meta, "state_dict": state}, out)
        with torch.no_grad():
            got = _from_deploy_file(out, None).net(x)
    elif fmt == "safetensors":
        st = require("safetensors.torch", "safetensors")
        state = {k: v.detach().cpu().clone().contiguous() for k, v in dep.net.state_dict().items()}
        header = {"format": DEPLOY_FORMAT, **meta}
        data = st.save(state, metadata=safetensors_metadata(header))
        atomic_write_bytes(data, out)
        with torch.no_grad():
            got = _from_deploy_file(out, None).net(x)
    elif fmt == "torchscript":
        with _no_jit_deprecation():
            try:
                scripted = torch.jit.script(dep.net)
            except Exception:  # a network TorchScript cannot compile: trace it (fixed control flow)
                scripted = torch.jit.trace(dep.net, x)
            torch.jit.save(scripted, str(out), _extra_files={"okd.json": json.dumps(meta)})
            with torch.no_grad():
                got = torch.jit.load(str(out), map_location="cpu")(x)
    else:
        _export_onnx(dep.net, x, out, meta)
        got = onnx_logits(out, x)
        checked = "onnxruntime"
        if got is None:
            import onnx

            onnx.checker.check_model(str(out))
            return ExportResult(out, fmt, None, training_diff, "onnx.checker only (onnxruntime not installed)")
    diff = _max_diff(got, ref)
    if not _close(got, ref, TOLERANCE[fmt]):
        raise OKDError(f"{out}: the exported network's logits differ from PyTorch's by up to {diff:.3g}")
    return ExportResult(out, fmt, diff, training_diff, checked)
