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

from okd.errors import CheckpointError


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
