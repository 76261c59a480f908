"""timm models (``model.name: timm:<name>``): FFSD with timm's feature taps and DML, on a class-folder dataset.

Runs where timm (and so torchvision) is installed: CI builds a second environment for it (``.ci/run``);
elsewhere the whole file is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
import torch

pytestmark = pytest.mark.timm
timm = pytest.importorskip("timm", reason="timm is not installed (the okd[timm] extra; CI runs these in a second venv)")
pytest.importorskip("PIL")

from folder_fixtures import quick_folder_run, write_class_folder  # noqa: E402

from okd.errors import ConfigError  # noqa: E402
from okd.methods.build import build_method, load_config  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("timm_data"))


def _overrides(data: Path, out: Path, method: str, name: str, epochs: int, *extra: str) -> list[str]:
    run = (f"method.name={method}", "optim.lr=0.02", f"name={name}", f"train.epochs={epochs}", *extra)
    return quick_folder_run(data, out, 32, "center", *run)


def _run(folder: Path, tmp_path: Path, method: str, *extra: str) -> Path:
    full, resumed = helpers.train_and_resume(None, lambda n, e: _overrides(folder, tmp_path, method, n, e, *extra))
    helpers.assert_same_runs(full, resumed)
    text = helpers.cli("export", full, "--format", "state_dict", "--out", tmp_path / "net.pt")
    assert "same logits as the method's deployed head" in text
    assert "circle" in helpers.cli("predict", full, folder / "val" / "circle" / "1.png")
    return full


def test_ffsd_on_a_timm_cnn_with_its_feature_taps(folder, tmp_path):
    full = _run(folder, tmp_path, "ffsd", "model.name=timm:test_resnet", "method.warmup_epochs=0")
    deploy = torch.load(full / "deploy.pt", map_location="cpu", weights_only=True)
    assert deploy["model_spec"]["name"] == "timm:test_resnet" and deploy["model_spec"]["taps"] is None
    m = build_method(load_config(None, ["method.name=ffsd", "model.name=timm:test_resnet", "data.dataset=cifar10"]), 3)
    assert m.leader.tap_names == ["layer2", "layer3", "layer4"]  # timm's feature_info: the last three reductions
    assert m.leader.tap_shapes == [(48, 4, 4), (192, 2, 2), (96, 1, 1)]
    # the README's line: the shipped FFSD example config with a timm model keeps its taps layer1..layer3
    cfg = load_config("examples/ffsd_my_cnn", ["model.name=timm:test_resnet", "data.image_size=32"])
    assert build_method(cfg, 3).leader.tap_names == ["layer1", "layer2", "layer3"]


def test_dml_on_a_timm_vit(folder, tmp_path):
    full = _run(folder, tmp_path, "dml", "model.name=timm:test_vit", "model.kwargs.img_size=32")
    deploy = torch.load(full / "deploy.pt", map_location="cpu", weights_only=True)
    assert deploy["model_spec"]["kwargs"] == {"img_size": 32}


def test_timm_taps_must_be_feature_maps_and_pretrained_needs_a_local_file(tmp_path):
    vit = ["model.name=timm:test_vit", "model.kwargs.img_size=32", "data.dataset=cifar10"]
    with pytest.raises(ConfigError, match="no taps: set model.taps"):
        build_method(load_config(None, ["method.name=ffsd", *vit]), 3)
    with pytest.raises(ConfigError, match="needs model.weights=PATH"):
        load_config(None, ["model.name=timm:test_resnet", "model.pretrained=true"])
    with pytest.raises(ConfigError, match="timm has no model"):
        build_method(load_config(None, ["model.name=timm:no_such_net", "data.dataset=cifar10"]), 3)
    source = timm.create_model("test_resnet", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    cfg = load_config(
        None, ["model.name=timm:test_resnet", "model.pretrained=true", f"model.weights={tmp_path / 'w.pth'}"]
    )
    net = build_method(cfg, 3).net.net
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight) and net.fc.out_features == 3


def test_the_core_imports_neither_timm_nor_torchvision():
    import subprocess
    import sys

    code = (
        "import sys; import okd.cli, okd.methods, okd.models, okd.data, okd.report.export; "
        "from okd.methods.build import build_method, load_config; "
        "build_method(load_config(None, ['method.name=ffsd', 'model.name=resnet20']), 10); "
        "bad = [m for m in ('timm', 'torchvision') if m in sys.modules]; assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=helpers.REPO)
    assert done.returncode == 0, done.stderr[-2000:]
