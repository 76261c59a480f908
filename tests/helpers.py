"""Helpers shared by the test files in every folder under ``tests/`` (``import helpers``: pytest puts ``tests/``, the
folder of the top ``conftest.py``, on ``sys.path``).

- independent loss references written out by hand (``ref_kl``, ``ref_ce``);
- short deterministic runs on the ``cifar10_root`` fixture (``quick_overrides``, ``train_and_resume``) and bitwise
  comparisons of two runs (``assert_same``, ``assert_same_runs``);
- messages whatever their wrapping (``mentions``);
- the report commands (``cli``) and the short runs that report/test_export.py and report/test_report.py share
  (``trained``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent  # the checkout (examples/, benchmarks/)


# ------------------------------------------------------------------------------------------- loss references
def ref_kl(student: Tensor, target: Tensor, T: float, eps: float = 0.0) -> Tensor:
    """T^2 (1/B) sum_b sum_k q (log q - log p), q = softmax(t/T) (+eps), written out by hand."""
    q = torch.exp(target / T) / torch.exp(target / T).sum(1, keepdim=True) + eps
    log_p = student / T - torch.logsumexp(student / T, dim=1, keepdim=True)
    return T * T * (q * (q.log() - log_p)).sum() / student.shape[0]


def ref_ce(z: Tensor, y: Tensor) -> Tensor:
    return -(z - torch.logsumexp(z, 1, keepdim=True)).gather(1, y[:, None]).mean()


def assert_bn_updates_with_momentum_0_1(module: torch.nn.Module, *inputs: Tensor) -> int:
    """One train-mode forward of ``module`` from fresh BatchNorm buffers (0 / 1) leaves, in every BN layer,
    running mean = 0.1 x the batch mean and running var = 0.9 + 0.1 x the unbiased batch variance of that
    layer's input (PyTorch's momentum 0.1, as in the reference code). Returns the number of BN layers."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    seen: dict[torch.nn.Module, Tensor] = {}
    hooks = [bn.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0].detach().clone())) for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
        module.train()
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    for bn in bns:
        x = seen[bn].transpose(0, 1).flatten(1)  # channels x (batch and positions)
        torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(1, unbiased=True), rtol=1e-4, atol=1e-6)
    return len(bns)


# ------------------------------------------------------------------------------------------------ short runs
def quick_overrides(root: Path, out: Path, name: str, epochs: int, settings: dict[str, object] = {}) -> list[str]:  # noqa: B006
    """``key=value`` overrides of a short deterministic CPU run on the CIFAR-10 folder ``root`` (no download, no
    progress bar), written to ``out/name``; ``settings`` adds or replaces keys (limits, batch sizes, seed, method).

    The device is the CPU even where a GPU is present: bitwise resume is promised (and tested) on the CPU."""
    overrides: dict[str, object] = {
        "data.root": root,
        "data.download": "false",
        "train.epochs": epochs,
        "train.deterministic": "true",
        "train.device": "cpu",
        "train.progress": "none",
        "output_dir": out,
        "name": name,
    }
    overrides.update(settings)
    return [f"{k}={v}" for k, v in overrides.items()]


def train_and_resume(config: str | Path | None, overrides: Callable[[str, int], list[str]], epochs: int = 2):
    """Train ``epochs`` epochs straight (run ``full``) and ``epochs - 1`` then resumed to ``epochs`` (run ``split``).

    ``overrides(name, epochs)`` gives the overrides of each run. Returns both run folders."""
    from okd.engine.trainer import config_from_run, train
    from okd.methods.build import load_config

    full = train(load_config(config, overrides("full", epochs)))
    split = train(load_config(config, overrides("split", epochs - 1)))
    resumed = train(config_from_run(split, [f"train.epochs={epochs}"]), run_dir=split, resume=True)
    return full, resumed


def comparable(history: list[dict]) -> list[dict]:
    """Metric rows without the timings (the only values two identical runs may differ in)."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of two nested checkpoint values (tensors, dicts, lists, tuples, plain values)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_runs(a: Path, b: Path, metrics: bool = True) -> tuple[dict, dict]:
    """Two run folders ended at the same epoch with bitwise-equal method state (every tensor of ``a``'s) and,
    with ``metrics``, the same metric rows but for timings. Returns both ``last.pt`` checkpoints."""
    from okd.io import load_checkpoint
    from okd.runs.metrics import read_metrics_csv

    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert sa["epoch"] == sb["epoch"]
    for key, value in sa["method"].items():
        assert torch.equal(value, sb["method"][key]), key
    if metrics:
        assert comparable(read_metrics_csv(a / "metrics.csv")) == comparable(read_metrics_csv(b / "metrics.csv"))
    return sa, sb


# ------------------------------------------------------------------------------------------------ messages
def mentions(text: str, phrase: str) -> bool:
    """``phrase`` occurs in ``text`` whatever the line wrapping: the CLI wraps messages at 100 columns, which
    splits phrases at spaces and long words (temporary paths) anywhere, so all whitespace is ignored."""
    return "".join(phrase.split()) in "".join(text.split())


# ---------------------------------------------------------------------------------------- report and export
def cli(*argv) -> str:
    """Run an ``okd`` report subcommand in-process; asserts exit status 0 and returns its stdout."""
    from okd.report.commands import register_cli

    parser = argparse.ArgumentParser(prog="okd")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


def trained(tmp_path_factory, cifar10_root: Path, config: str, name: str, extra: Sequence[str] = ()) -> Path:
    """A short real run of the packaged ``config``, trained once per session for each (config, name, extra)
    and shared by the test files through the base temp dir; the folder name carries a key of all three."""
    from okd.configs import resolve_config
    from okd.engine.trainer import train
    from okd.methods.build import load_config, method_class

    key = hashlib.sha256(repr((str(config), name, tuple(str(e) for e in extra))).encode()).hexdigest()[:10]
    out, run = tmp_path_factory.getbasetemp() / "okd_runs", f"{name}_{key}"
    if not (out / run / "deploy.pt").is_file():
        path = resolve_config(config)
        method_class(yaml.safe_load(path.read_text())["method"]["name"])  # register it
        overrides = [
            f"data.root={cifar10_root}",
            "data.download=false",
            "data.limit_train=64",
            "data.limit_test=64",
            "data.batch_size=16",
            "data.test_batch_size=64",
            "train.max_steps_per_epoch=1",
            "train.progress=none",
            "train.epochs=1",
            f"output_dir={out}",
            f"name={run}",
            "seed=1",
            *extra,
        ]
        train(load_config(path, overrides))
    return out / run


class RecordingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel (no process group needed): records each wrap with its keywords
    (``made``), the names handed over to be ignored (``ignored``) and each forward through it (``forwards``).
    ``RecordingDDP.install(monkeypatch)`` puts it in place of the real class with empty records."""

    made: list = []
    ignored: list = []
    forwards: list = []

    def __init__(self, module, device_ids=None, find_unused_parameters=False):
        super().__init__()
        self.module = module
        RecordingDDP.made.append((module, device_ids, find_unused_parameters))

    def forward(self, *args, **kwargs):
        RecordingDDP.forwards.append(len(args))
        return self.module(*args, **kwargs)

    @staticmethod
    def _set_params_and_buffers_to_ignore_for_model(module, names):
        RecordingDDP.ignored.append((module, list(names)))

    @classmethod
    def install(cls, monkeypatch) -> type:
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", cls)
        for name in ("made", "ignored", "forwards"):
            monkeypatch.setattr(cls, name, [])
        return cls
