"""Nothing okd loads can run code: every command refuses a pickled object (weights_only=True), and the load-side
messages for incomplete, mismatched or wrong files are okd's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import helpers
import pytest
import torch

from okd.cli import main
from okd.errors import CheckpointError
from okd.io import load_checkpoint
from okd.methods.kd import load_teacher
from okd.models import create_model

FFSD = "cifar10/ffsd_resnet20"


class Marker:
    """Unpickling this object creates the file ``path`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def ffsd_run(tmp_path_factory, cifar10_root) -> Path:
    return helpers.trained(tmp_path_factory, cifar10_root, FFSD, "ffsd")


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("export", "*.png", "*.csv.tmp"))
    return dest


def _poison(path: Path, marker: Path) -> None:
    """Rewrite the okd file ``path`` with a marker object among its real contents."""
    real = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({"format": real.get("format"), "payload": Marker(marker), **real}, path)


def test_the_marker_pickle_runs_code_when_loaded_unsafely(tmp_path):
    """The test object is a real threat: an unsafe load creates the marker (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    torch.save({"x": Marker(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("poisoned", "argv"),
    [
        ("last.pt", ["train", "--resume", "{run}"]),
        ("last.pt", ["test", "{run}"]),
        ("best.pt", ["test", "{run}", "--checkpoint", "best"]),
        ("best.pt", ["test", "{run}/best.pt"]),
        ("last.pt", ["attention", "{run}", "--images", "1", "--similarity-images", "2"]),
        ("last.pt", ["report", "{run}"]),
        ("deploy.pt", ["export", "{run}", "--format", "state_dict"]),
        ("last.pt", ["export", "{run}/last.pt", "--format", "state_dict"]),
        ("deploy.pt", ["predict", "{run}/deploy.pt", "{image}"]),
        ("deploy.pt", ["predict", "{run}", "{image}"]),
    ],
)
def test_every_command_refuses_a_pickled_object(poisoned, argv, ffsd_run, tmp_path, capsys):
    run = _copy(ffsd_run, tmp_path)
    marker = tmp_path / "ran"
    _poison(run / poisoned, marker)
    image = tmp_path / "img.png"
    image.write_bytes(b"")  # never read: the model is refused first
    assert main([a.format(run=run, image=image) for a in argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert not marker.exists()
    assert "refuses to unpickle arbitrary objects" in err and "never loads code" in err
    assert poisoned in err and "(io.open)" in err  # the refused global is named
    assert "Weights only load failed" not in err


def test_kd_teacher_refuses_a_pickled_object(ffsd_run, tmp_path):
    marker = tmp_path / "ran"
    teacher = _copy(ffsd_run, tmp_path) / "deploy.pt"
    _poison(teacher, marker)
    with pytest.raises(CheckpointError, match="refuses to unpickle arbitrary objects") as info:
        load_teacher("resnet20", 10, str(teacher))
    assert not marker.exists() and "method.teacher_checkpoint" in str(info.value)


def test_what_okd_writes_loads_with_weights_only(ffsd_run):
    for name in ("last.pt", "best.pt", "deploy.pt"):
        torch.load(ffsd_run / name, map_location="cpu", weights_only=True)  # raises if anything is an object
    rng = torch.load(ffsd_run / "last.pt", weights_only=True)["rng_per_rank"][0]
    assert isinstance(rng["numpy"]["keys"], torch.Tensor) and rng["numpy"]["keys"].numel() == 624


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from okd.engine.seeding import restore_rng_state, rng_state, seed_everything

    seed_everything(11)
    random.random()  # advance every stream (numpy's randn leaves a cached gaussian in its state)
    np.random.randn()
    torch.rand(2)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(), torch.rand(2))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------------------------------ load-side messages
@pytest.mark.parametrize("key", ["config", "optimizers", "rng_per_rank"])
def test_resume_names_a_missing_checkpoint_key(key, ffsd_run, tmp_path, capsys):
    run = _copy(ffsd_run, tmp_path)
    ckpt = load_checkpoint(run / "last.pt")
    del ckpt[key]
    torch.save(ckpt, run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"lacks '{key}'" in err and "KeyError" not in err


def test_deploy_model_field_that_does_not_fit_its_weights(ffsd_run, tmp_path, capsys):
    run = _copy(ffsd_run, tmp_path)
    deploy = load_checkpoint(run / "deploy.pt")
    torch.save({**deploy, "model": "resnet32"}, run / "deploy.pt")
    assert main(["export", str(run / "deploy.pt"), "--format", "state_dict"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "says model='resnet32'" in err and "not that network's" in err
    assert "Error(s) in loading state_dict" not in err


def _hundred_class_deploy(run: Path) -> None:
    deploy = load_checkpoint(run / "deploy.pt")
    state = create_model("resnet20", 100).state_dict()
    torch.save({**deploy, "num_classes": 100, "state_dict": state}, run / "deploy.pt")


def test_a_100_class_deploy_in_a_10_class_run_names_both_counts(ffsd_run, tmp_path, capsys):
    from PIL import Image

    run = _copy(ffsd_run, tmp_path)
    _hundred_class_deploy(run)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    for argv in (["export", str(run), "--format", "state_dict"], ["predict", str(run), str(image)]):
        assert main(argv) == 2, argv
        err = " ".join(capsys.readouterr().err.split())
        assert "100-class network" in err and "(cifar10) has 10 classes" in err, argv
    (run / "config.yaml").unlink()  # no config to tell the data set: the run's checkpoint still does
    assert main(["export", str(run), "--format", "state_dict"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "100-class network, but the run's data set (cifar10) has 10 classes" in err


def test_kd_teacher_given_the_wrong_file_gets_okds_hint(ffsd_run, tmp_path):
    run = _copy(ffsd_run, tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "deploy.pt").read_bytes()[:300])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path, says in (
        (run / "last.pt", "is an okd run checkpoint"),
        (truncated, "cannot be read"),
        (garbage, "cannot be read"),
    ):
        with pytest.raises(CheckpointError) as info:
            load_teacher("resnet20", 10, str(path))
        msg = str(info.value)
        assert says in msg and "deploy.pt" in msg and "state_dict" in msg, msg
        assert "Weights only load failed" not in msg and "OSError" not in msg, msg
    _hundred_class_deploy(run)
    with pytest.raises(CheckpointError, match="100-class network, but the student's data set has 10 classes"):
        load_teacher("resnet20", 10, str(run / "deploy.pt"))


def test_a_file_holding_code_is_refused_where_a_damaged_one_is_read_past(tmp_path):
    """epoch_of (what the writer and the readers ask of best.pt/deploy.pt) says "no epoch" for a missing, truncated
    or epoch-less file, which is then rebuilt from last.pt; a file holding a pickled object is refused instead,
    and a resume's repair does not write over it."""
    from okd.errors import UnsafeCheckpointError
    from okd.runs.records import epoch_of
    from okd.runs.store import RunStore

    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "x": 1}, tmp_path / "ok.pt")
    assert epoch_of(tmp_path / "ok.pt") == 1 and epoch_of(tmp_path / "missing.pt") is None
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    torch.save({"x": 1}, tmp_path / "no_epoch.pt")
    assert epoch_of(tmp_path / "truncated.pt") is None and epoch_of(tmp_path / "no_epoch.pt") is None
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "payload": Marker(marker)}, run / "deploy.pt")
    with pytest.raises(UnsafeCheckpointError, match="refuses to unpickle arbitrary objects"):
        epoch_of(run / "deploy.pt")
    before = (run / "deploy.pt").read_bytes()
    last = {"epoch": 1, "history": [{"epoch": 1}], "best": {"epoch": 0}}
    with RunStore(run).lock(create=False) as store, pytest.raises(UnsafeCheckpointError):
        store.reconcile(last, lambda: {"format": "okd-deploy-v1", "epoch": 1})
    assert (run / "deploy.pt").read_bytes() == before and not marker.exists()
