"""The user's own networks (import path, taps by hooks) on a generic class-folder dataset, end to end."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import helpers
import pytest
import torch

from okd.engine.trainer import config_from_run
from okd.errors import ConfigError, OKDError
from okd.methods.build import build_method, load_config
from okd.report.scoring import score_checkpoint
from okd.runs.metrics import read_metrics_csv
from okd.runs.reader import Run

pytest.importorskip("PIL")
from folder_fixtures import quick_folder_run, write_class_folder  # noqa: E402

MODULE = "okd_user_cnn"
USER_CODE = """
from torch import nn


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyCNN(nn.Module):
    def __init__(self, num_classes, width=4):
        super().__init__()
        self.stem = block(3, width, 1)
        self.layer1 = block(width, width, 1)
        self.layer2 = block(width, 2 * width, 2)
        self.layer3 = block(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x)))))))


class Skip(nn.Module):  # not a chain of its children: the input skips layer1
    def __init__(self, num_classes):
        super().__init__()
        self.stem, self.layer1 = block(3, 4, 1), block(4, 4, 1)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.flatten(self.pool(x + self.layer1(x))))


def build(num_classes, width=4):
    return TinyCNN(num_classes, width)


def skip(num_classes):
    return Skip(num_classes)


def not_a_module(num_classes):
    return "a string"


def too_many_logits(num_classes):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes + 1))
"""


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """The user's module on sys.path and a generated 3-class folder dataset."""
    base = tmp_path_factory.mktemp("user")
    (base / "code").mkdir()
    (base / "code" / f"{MODULE}.py").write_text(textwrap.dedent(USER_CODE))
    sys.path.insert(0, str(base / "code"))
    data = write_class_folder(base / "data")
    yield base, data
    sys.path.remove(str(base / "code"))
    sys.modules.pop(MODULE, None)


def _overrides(data: Path, out: Path, method: str | None, *extra: str) -> list[str]:
    chosen = [f"method.name={method}", f"model.name={MODULE}:build"] if method else []
    return quick_folder_run(data, out, 16, "pad_crop", *chosen, "data.pad=2", "data.compute_stats=true", *extra)


def _train_resume_export_predict(
    user_env, tmp_path, monkeypatch, method, *extra, config=None, module=MODULE, fmt="state_dict"
):
    """Train 2 epochs straight and 1 + resumed 1 (bitwise equal), then export and predict from the run."""
    base, data = user_env
    monkeypatch.setenv("OKD_ALLOW_IMPORT", module)  # resume reads the run's config back: it needs consent
    full, resumed = helpers.train_and_resume(
        config,
        lambda name, epochs: _overrides(data, tmp_path, method, f"name={name}", f"train.epochs={epochs}", *extra),
    )
    helpers.assert_same_runs(full, resumed)
    deploy = torch.load(full / "deploy.pt", map_location="cpu", weights_only=True)
    assert deploy["model_spec"]["name"].startswith(f"{module}:") and deploy["classes"] == ["circle", "square", "zigzag"]
    assert deploy["size"] == 16 and deploy["dataset"] == "folder"
    # the run's normalisation is the training split's own statistics, recorded for predict
    assert deploy["mean"][0] > 0.3 and deploy["mean"] != [0.485, 0.456, 0.406]
    monkeypatch.delenv("OKD_ALLOW_IMPORT", raising=False)
    with pytest.raises(ConfigError, match=f"OKD_ALLOW_IMPORT={module}"):
        helpers.cli("export", full, "--format", "state_dict", "--out", tmp_path / "net.pt")
    with pytest.raises(ConfigError, match=f"OKD_ALLOW_IMPORT={module}"):
        config_from_run(full, ["train.epochs=3"])  # resume
    with pytest.raises(ConfigError, match=f"OKD_ALLOW_IMPORT={module}"):
        score_checkpoint(full)  # okd test
    with pytest.raises(ConfigError, match=f"OKD_ALLOW_IMPORT={module}"):
        score_checkpoint(full / "deploy.pt")  # okd test deploy.pt
    monkeypatch.setenv("OKD_ALLOW_IMPORT", module)
    metrics, info = score_checkpoint(full)  # okd test: the run's own last test metrics, re-evaluated
    last = read_metrics_csv(full / "metrics.csv")[-1]
    assert metrics and all(last[f"test/{k}"] == pytest.approx(v, abs=1e-6) for k, v in metrics.items())
    deployed, _ = score_checkpoint(full / "deploy.pt")  # okd test deploy.pt: the deployed network alone
    head = info["deploy_head"]
    assert deployed[f"{head}/top1"] == pytest.approx(metrics[f"{head}/top1"], abs=1e-6)
    text = helpers.cli("export", full, "--format", fmt, "--out", tmp_path / f"net.{fmt}")
    assert "same logits as the method's deployed head" in text and f"({fmt})" in text
    image = data / "val" / "square" / "0.png"
    top = helpers.cli("predict", full, image)
    assert "square" in top and "circle" in top  # top-k lists the run's own class names
    return full, deploy


@pytest.fixture
def example_module(monkeypatch):
    """The README's example network, examples/my_cnn.py, importable as my_cnn."""
    monkeypatch.syspath_prepend(str(helpers.REPO / "examples"))
    yield "my_cnn"
    sys.modules.pop("my_cnn", None)


@pytest.mark.slow
def test_ffsd_example_config_on_the_example_cnn(user_env, example_module, tmp_path, monkeypatch):
    full, deploy = _train_resume_export_predict(
        user_env, tmp_path, monkeypatch, None, "model.kwargs.width=4", "method.warmup_epochs=0",
        config="examples/ffsd_my_cnn", module=example_module, fmt="safetensors",
    )  # fmt: skip
    top = helpers.cli("predict", tmp_path / "net.safetensors", user_env[1] / "val" / "zigzag" / "1.png")
    assert "zigzag" in top  # the export alone rebuilds the network (its model_spec travels in the metadata)
    assert deploy["model_spec"]["taps"] == ["layer1", "layer2", "layer3"] and deploy["method"] == "ffsd"
    assert all(k.startswith("net.") for k in deploy["state_dict"])  # the leader alone, the user's module inside
    text = helpers.cli("attention", full, "--out", full / "att.png")
    assert "leader" in text
    # a deploy.pt lost in a stop is rebuilt (in memory, by the reader) from last.pt with the same rebuild and
    # preprocessing fields
    (full / "deploy.pt").unlink()
    again, source = Run(full).deploy_record()
    assert "rebuilt" in source and not (full / "deploy.pt").exists()
    for key in ("model_spec", "classes", "mean", "std", "size", "resize"):
        assert again[key] == deploy[key], key


@pytest.mark.slow
def test_dml_example_config_on_the_example_cnn(user_env, example_module, tmp_path, monkeypatch):
    _, deploy = _train_resume_export_predict(
        user_env, tmp_path, monkeypatch, None, "model.kwargs.width=3", "data.in_memory=true",
        config="examples/dml_my_cnn", module=example_module, fmt="onnx",
    )  # fmt: skip
    assert deploy["model_spec"]["kwargs"] == {"width": 3} and deploy["model_spec"]["taps"] is None
    assert deploy["state_dict"]["net.stem.0.weight"].shape[0] == 3 and deploy["method"] == "dml"


def _build(user_env, method: str, *extra: str):
    return build_method(load_config(None, [f"method.name={method}", "data.dataset=cifar10", *extra]), 5)


def test_taps_are_captured_without_leaving_hooks(user_env):
    m = _build(user_env, "ffsd", f"model.name={MODULE}:build", "model.taps=[layer1,layer2,layer3]")
    net = m.students[0]
    z, taps = net.forward_taps(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 5) and [tuple(t.shape[1:]) for t in taps] == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert net.tap_channels == (4, 8, 16)
    assert all(not mod._forward_hooks for mod in net.modules())  # no state kept between calls
    with torch.no_grad():
        assert torch.equal(net.forward_taps(taps[0].new_ones(2, 3, 32, 32))[0], net(taps[0].new_ones(2, 3, 32, 32)))


def test_unsupported_tap_layout_says_which_taps_qualify(user_env):
    with pytest.raises(
        ConfigError,
        match=r"stem \[32, 32\] -> layer1 \[32, 32\] does not halve.*\['layer1', 'layer2', "
        r"'layer3'\] form such a chain",
    ):
        _build(user_env, "ffsd", f"model.name={MODULE}:build", "model.taps=[stem,layer1,layer2,layer3]")
    with pytest.raises(ConfigError, match="no taps: set model.taps"):
        _build(user_env, "ffsd", f"model.name={MODULE}:build")
    with pytest.raises(ConfigError, match=r"feature maps .*fc: \[5\]"):
        _build(user_env, "ffsd", f"model.name={MODULE}:build", "model.taps=[layer3,fc]")
    with pytest.raises(ConfigError, match="not submodules.*top-level submodules are"):
        _build(user_env, "ffsd", f"model.name={MODULE}:build", "model.taps=[layer9]")
    # without self-distillation the spatial layout is free (fusion and diversity use the deepest tap only)
    _build(user_env, "ffsd", f"model.name={MODULE}:build", "model.taps=[stem,layer3]", "method.self_distillation=none")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_pkg.nets:build", "no module 'no_such_pkg' can be imported. Put the folder"),
        (f"{MODULE}:biuld", "has no attribute 'biuld'; its public callables: .*build"),
        (f"{MODULE}:not_a_module", "returned a str, not a torch.nn.Module"),
        (f"{MODULE}:too_many_logits", r"returned a tensor of shape \[2, 6\].*must return logits of shape \[2, 5\]"),
        (f"{MODULE}:build:x", "neither a registered model nor an import path"),
    ],
)
def test_bad_import_paths_are_clear_errors(user_env, name, message):
    with pytest.raises(ConfigError, match=message):
        _build(user_env, "dml", f"model.name={name}")


def test_rebuilding_from_a_stored_spec_needs_the_users_consent(user_env, monkeypatch):
    from okd.models.spec import build_from_spec

    spec = {"name": f"{MODULE}:build", "kind": "import", "kwargs": {"width": 2}, "taps": None, "input_size": 16}
    monkeypatch.delenv("OKD_ALLOW_IMPORT", raising=False)
    with pytest.raises(OKDError, match="only when you allow that module"):
        build_from_spec(spec, 4, from_file=True)
    monkeypatch.setenv("OKD_ALLOW_IMPORT", "other,okd_user_cnn")
    net = build_from_spec(spec, 4, from_file=True)
    assert net(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


@pytest.mark.slow
def test_one_example_config_with_branch_from_then_kd_from_its_branch(user_env, example_module, tmp_path, monkeypatch):
    full, deploy = _train_resume_export_predict(
        user_env, tmp_path, monkeypatch, None, "model.kwargs.width=4", config="examples/one_my_cnn",
        module=example_module,
    )  # fmt: skip
    assert deploy["model_spec"]["branch_from"] == "layer3" and deploy["method"] == "one"
    assert "layer3.0.weight" in deploy["state_dict"]  # trunk + one branch, under the user's own stage names
    _, data = user_env
    monkeypatch.setenv("OKD_ALLOW_IMPORT", f"{example_module},{MODULE}")
    kd = helpers.train_and_resume(
        None,
        lambda name, epochs: _overrides(
            data,
            tmp_path / "kd",
            "kd",  # the student: the test's own TinyCNN; the teacher: the ONE run's deployed branch
            f"name={name}",
            f"train.epochs={epochs}",
            f"method.teacher_model={example_module}:build",
            f"method.teacher_checkpoint={full / 'deploy.pt'}",
        ),
    )
    helpers.assert_same_runs(*kd)


def test_cmff_refuses_a_user_network_saying_which_methods_take_it(user_env):
    with pytest.raises(ConfigError, match="not model.name='okd_user_cnn:build'.*train with ffsd, dml"):
        _build(user_env, "cmff", f"model.name={MODULE}:build", "model.taps=[layer1,layer2,layer3]")


def test_branch_from_refuses_networks_that_are_not_a_chain_of_stages(user_env):
    with pytest.raises(ConfigError, match="in order does not give its own forward's output"):
        _build(user_env, "one", f"model.name={MODULE}:skip", "model.branch_from=layer1")
    with pytest.raises(ConfigError, match="no multi-branch split.*model.branch_from"):
        _build(user_env, "one", f"model.name={MODULE}:build")
    with pytest.raises(ConfigError, match="top-level stage of .*stem', 'layer1'"):
        _build(user_env, "one", f"model.name={MODULE}:build", "model.branch_from=layer7")
    with pytest.raises(ConfigError, match="must both output feature maps"):
        _build(user_env, "one", f"model.name={MODULE}:build", "model.branch_from=flatten")


def test_default_run_name_of_an_import_path_has_no_colon():
    from okd.engine.trainer import default_run_name

    cfg = load_config(None, ["model.name=pkg.nets:build", "method.name=dml", "data.dataset=folder"])
    assert default_run_name(cfg) == "folder_dml_pkg.nets-build_s0"
