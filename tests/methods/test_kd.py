"""KD (``docs/methods.md``, ``kd``): the frozen teacher in eval mode and the teacher checkpoint formats, with
the errors a wrong one gives (its loss dict against the reference: ``test_shared.py``)."""

from __future__ import annotations

import pytest
import torch
from method_helpers import (
    K,
    batch,
    make,
    summed,
)
from safetensors.torch import save_file

from okd.errors import CheckpointError
from okd.methods.kd import load_teacher
from okd.models.deploy_file import safetensors_metadata
from okd.models.factory import create_model


# --------------------------------------------------------------------------------------- gradient flow
def test_kd_teacher_is_frozen_in_eval_mode(teacher_file):
    x, y = batch()
    m = make("kd", teacher_model="resnet20", teacher_checkpoint=str(teacher_file))
    m.train()
    assert m.student.training and not m.teacher.training
    before = m.teacher.bn1.running_mean.clone()
    summed(m.training_step(x, y, 0)).backward()
    assert torch.equal(before, m.teacher.bn1.running_mean)
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert [g.name for g in m.param_groups()] == ["student"]


# ------------------------------------------------------------------------------ KD teacher checkpoints
def test_kd_teacher_checkpoint_formats(teacher_file, tmp_path):
    state = torch.load(teacher_file, weights_only=True)
    deploy = {"format": "okd-deploy-v1", "model": "resnet20", "num_classes": K, "state_dict": state}
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    for i, obj in enumerate((deploy, wrapped)):
        torch.save(obj, tmp_path / f"{i}.pt")
        m = make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / f"{i}.pt"))
        loaded = m.teacher.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())  # every tensor, BN buffers included
        assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())


def test_kd_teacher_from_a_safetensors_export(teacher_file, tmp_path):
    """A ``.safetensors`` export (``okd export --format safetensors``) is read without pickle: the same weights."""
    state = torch.load(teacher_file, weights_only=True)
    info = {"format": "okd-deploy-v1", "model": "resnet20", "num_classes": K, "state_dict": state}
    save_file(state, tmp_path / "teacher.safetensors", metadata=safetensors_metadata(info))
    m = make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "teacher.safetensors"))
    loaded = m.teacher.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    save_file(state, tmp_path / "k100.safetensors", metadata=safetensors_metadata({**info, "num_classes": 100}))
    with pytest.raises(CheckpointError, match="100"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "k100.safetensors"))


def test_kd_teacher_given_as_a_mapping_is_built_with_its_kwargs(tmp_path):
    """``method.teacher_model`` as a member mapping (name + kwargs): the teacher is built as the mapping says."""
    torch.manual_seed(3)
    teacher = create_model("wrn16_2", K, dropout=0.25)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    given = {"name": "wrn16_2", "kwargs": {"dropout": 0.25}}
    m = make("kd", teacher_model=given, teacher_checkpoint=str(tmp_path / "teacher.pt"))
    assert m.teacher.layer1[0].dropout.p == 0.25 and not m.teacher.training
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(m.teacher(x), teacher.eval()(x))


def test_kd_teacher_mismatch_is_a_clear_error(teacher_file, tmp_path):
    with pytest.raises(CheckpointError, match="does not match method.teacher_model=resnet32"):
        make("kd", teacher_model="resnet32", teacher_checkpoint=str(teacher_file))
    torch.save({"format": "okd-deploy-v1", "model": "resnet56", "state_dict": {}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="holds a resnet56"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "d.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "none.pt"))
    torch.save({"format": "okd-run-v1", "method": {}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="deploy.pt"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "last.pt"))
    state = torch.load(teacher_file, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(100, 64), torch.zeros(100)
    torch.save(state, tmp_path / "k100.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "k100.pt"))


# ---------------------------------------------------------------------------------------------- validation
def _kd_params(**changes):
    from okd.methods.kd import KDParams

    return KDParams(**{"teacher_model": "resnet20", "teacher_checkpoint": "t.pt", **changes})


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"temperature": 0.0}, "method.temperature must be positive, got 0.0"),
        ({"temperature": -2.0}, "method.temperature must be positive"),
        ({"target_eps": -1e-7}, "method.target_eps must be >= 0, got -1e-07"),
        ({"alpha": 1.5}, r"method.alpha must be \[0, 1\] for form=hinton, got 1.5"),
        ({"alpha": -0.5, "form": "okddip"}, "method.alpha must be >= 0 for form=okddip, got -0.5"),
        ({"form": "fitnet"}, "method.form='fitnet' is not valid; choose one of: hinton, okddip"),
        ({"teacher_model": ""}, "method.teacher_model is required for kd"),
        ({"teacher_checkpoint": ""}, "method.teacher_checkpoint is required for kd"),
        ({"teacher_model": "resnet21"}, "resnet21"),
    ],
)
def test_kd_params_are_validated(changes, says):
    from okd.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        _kd_params(**changes).validate()


def test_kd_params_at_the_edges_are_accepted():
    for changes in ({"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 4.0, "form": "okddip"}, {"target_eps": 0.0}):
        _kd_params(**changes).validate()
    assert _kd_params().effective_alpha == 0.9 and _kd_params(form="okddip").effective_alpha == 1.0
    assert _kd_params(alpha=0.25).effective_alpha == 0.25


def test_kd_teacher_mismatch_names_the_keys_and_the_class_count(teacher_file, tmp_path):
    state = torch.load(teacher_file, weights_only=True)
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as info:
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "odd.pt"))
    msg = str(info.value)
    assert f"teacher checkpoint {str(tmp_path / 'odd.pt')!r} does not match method.teacher_model=resnet20 with" in msg
    assert f"{K} classes (missing keys: ['fc.bias']; unexpected keys: ['extra.weight'])" in msg
    torch.save({"state_dict": {}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"holds no state_dict \(a mapping of parameter names to tensors\)"):
        make("kd", teacher_model="resnet20", teacher_checkpoint=str(tmp_path / "empty.pt"))


def test_a_teacher_named_as_its_run_built_it_gets_the_recorded_kwargs(tmp_path):
    """A deploy.pt whose ``model_spec`` records the teacher's name with kwargs rebuilds it with them (the teacher as
    its run built it), not with the registry's defaults."""
    state = create_model("wrn16_2", 10, dropout=0.25).state_dict()
    spec = {"name": "wrn16_2", "kind": "registered", "kwargs": {"dropout": 0.25}}
    deploy = {"format": "okd-deploy-v1", "model": "wrn16_2", "num_classes": 10, "state_dict": state, "model_spec": spec}
    torch.save(deploy, tmp_path / "deploy.pt")
    teacher = load_teacher("wrn16_2", 10, str(tmp_path / "deploy.pt"))
    assert teacher.layer1[0].dropout.p == 0.25 and not teacher.training
