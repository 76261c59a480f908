"""Export of the deployable network (state_dict, TorchScript, ONNX) with round-trip checks, and okd predict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from okd.data.cifar import DATASET_STATS
from okd.errors import CheckpointError, OKDError
from okd.methods.kd import load_teacher
from okd.models import create_model
from okd.report.export import export, load_deployable, sample_inputs
from okd.report.predict import load_predictor, predict

FFSD = "cifar10/ffsd_resnet20"


@pytest.fixture(scope="module")
def ffsd_run(tmp_path_factory, cifar10_root) -> Path:
    return helpers.trained(tmp_path_factory, cifar10_root, FFSD, "ffsd")


def _leader_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    """The leader's logits straight from deploy.pt, as a plain backbone."""
    ckpt = torch.load(run / "deploy.pt", map_location="cpu", weights_only=True)
    net = create_model(ckpt["model"], ckpt["num_classes"]).eval()
    net.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        return net(x)


def test_deployable_is_the_leader_alone(ffsd_run):
    dep = load_deployable(ffsd_run)
    assert dep.model == "resnet20" and dep.num_classes == 10 and dep.method == "ffsd" and dep.dataset == "cifar10"
    assert dep.classes[:2] == ["airplane", "automobile"]
    assert not any(k.startswith(("leader_decoder", "students")) for k in dep.net.state_dict())
    x = sample_inputs(4)
    with torch.no_grad():
        assert torch.equal(dep.training_head(x), dep.net(x))  # the method's "leader" head is this network


def test_state_dict_round_trip(ffsd_run, tmp_path):
    out = tmp_path / "leader.pt"
    text = helpers.cli("export", ffsd_run, "--format", "state_dict", "--out", out)
    assert f"wrote {out} (state_dict)" in text and "same logits as the method's deployed head" in text
    saved = torch.load(out, map_location="cpu", weights_only=True)
    net = create_model(saved["model"], saved["num_classes"]).eval()
    net.load_state_dict(saved["state_dict"])  # strict: exactly the backbone's keys
    x = sample_inputs(3, seed=7)
    with torch.no_grad():
        assert torch.equal(net(x), _leader_logits(ffsd_run, x))
    assert saved["classes"][3] == "cat" and len(saved["mean"]) == 3


@pytest.fixture(scope="module")
def torchscript_file(ffsd_run, tmp_path_factory) -> Path:
    res = export(ffsd_run, "torchscript", tmp_path_factory.mktemp("ts") / "leader_ts.pt")
    assert res.max_abs_diff <= 1e-5 and res.training_diff == 0.0
    return res.path


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_safetensors_round_trip(ffsd_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "leader.safetensors"
    text = helpers.cli("export", ffsd_run, "--format", "safetensors", "--out", out)
    assert f"wrote {out} (safetensors)" in text
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["okd"])
    header = (meta["model"], meta["method"], meta["num_classes"], meta["epoch"], meta["head"])
    assert header == ("resnet20", "ffsd", 10, 1, "leader")
    net = create_model(meta["model"], meta["num_classes"]).eval()
    net.load_state_dict(load_file(str(out)))  # a fresh network from the pickle-free file alone
    x = sample_inputs()
    with torch.no_grad():
        assert torch.equal(net(x), _leader_logits(ffsd_run, x))
    # okd reads it back too: export, predict and a KD teacher accept the file
    assert load_deployable(out).model == "resnet20"
    teacher = load_teacher("resnet20", 10, str(out))
    assert torch.equal(teacher.fc.weight, net.fc.weight)


def test_torchscript_round_trip(ffsd_run, torchscript_file):
    res_path = torchscript_file
    extra = {"okd.json": ""}
    module = torch.jit.load(str(res_path), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["okd.json"])["model"] == "resnet20"
    x = sample_inputs(5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _leader_logits(ffsd_run, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_matches_pytorch_in_onnxruntime(ffsd_run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    (tmp_path / "leader.onnx.data").write_bytes(b"stale")  # an earlier export's weights file goes too
    text = helpers.cli("export", ffsd_run, "--format", "onnx", "--out", tmp_path / "leader.onnx")
    assert "round trip (onnxruntime)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leader.onnx"]  # self-contained: no leader.onnx.data
    session = ort.InferenceSession(str(tmp_path / "leader.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 6):  # the batch dimension is dynamic
        x = sample_inputs(n, seed=11)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, _leader_logits(ffsd_run, x).numpy(), rtol=1e-4, atol=1e-4)
    assert "resnet20" in session.get_modelmeta().custom_metadata_map["okd"]


@pytest.mark.slow
def test_onnx_past_the_inline_limit_keeps_its_weights_beside_it(ffsd_run, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import okd.report.export as export_module

    monkeypatch.setattr(export_module, "ONNX_INLINE_LIMIT", 0)  # as if the weights passed protobuf's limit
    res = export(ffsd_run, "onnx", tmp_path / "big.onnx")
    assert res.max_abs_diff <= 1e-4 and (tmp_path / "big.onnx.data").stat().st_size > 0


def test_default_output_path_and_bad_format(ffsd_run):
    res = export(ffsd_run, "state_dict")
    assert res.path == ffsd_run / "export" / "resnet20_state_dict.pt" and res.path.is_file()
    with pytest.raises(OKDError, match="unknown export format"):
        export(ffsd_run, "tflite")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_deployable(ffsd_run / "nope.pt")


def test_predict_top5_on_png_files(ffsd_run, torchscript_file, cifar10_root, tmp_path):
    from PIL import Image

    from okd.data import load_cifar

    split = load_cifar(cifar10_root, "cifar10", train=False)
    files = []
    for i, size in enumerate([(32, 32), (64, 48)]):  # the second one is resized to 32x32
        path = tmp_path / f"img{i}.png"
        Image.fromarray(split.images[i].transpose(1, 2, 0)).resize(size).save(path)
        files.append(path)
    text = helpers.cli("predict", ffsd_run, *files)
    about, lines = text.strip().splitlines()[:2], text.strip().splitlines()[2:]
    assert about[0].startswith("model: resnet20 (10 classes, cifar10), head leader of ffsd, epoch ")
    assert about[0].endswith(f"; okd file {ffsd_run / 'deploy.pt'}")
    mean, std = (", ".join(f"{v:.4g}" for v in values) for values in (DATASET_STATS["cifar10"]))
    assert about[1] == (
        "preprocessing: RGB, resize to 32x32 (bicubic; kept when already that size), /255, "
        f"normalised with mean ({mean}) std ({std})"
    )
    assert lines[0] == str(files[0]) and lines[6] == str(files[1]) and len(lines) == 12
    for line in lines[1:6] + lines[7:12]:
        assert re.fullmatch(r"  [1-5]\. \S+\s+\d+\.\d\d%", line), line
        assert line.split()[1] in split.classes
    from_run = predict(ffsd_run, files)
    for model in (ffsd_run / "deploy.pt", torchscript_file):
        other = predict(model, files)
        assert [[c for c, _ in r] for r in other] == [[c for c, _ in r] for r in from_run]
        for a, b in zip(other, from_run, strict=True):
            np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-6)
    assert all(0.0 < sum(p for _, p in r) <= 1.0 + 1e-9 for r in from_run)
    scripted = load_predictor(torchscript_file)  # the exported file records the head and preprocessing too
    assert (scripted.kind, scripted.model, scripted.head, scripted.method) == (
        "TorchScript",
        "resnet20",
        "leader",
        "ffsd",
    )
    assert scripted.describe()[1] == about[1]


def test_predict_rejects_a_non_image(ffsd_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(OKDError, match="cannot read image"):
        predict(ffsd_run / "deploy.pt", [bad])
