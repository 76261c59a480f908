"""Classic KD (Hinton et al., 2015), ``docs/methods.md#kd``: a frozen, pre-trained teacher in eval mode.

    form='hinton' (default):  L = (1 - alpha) * CE(z_s, y) + alpha * KL_T(z_t -> z_s)      alpha = 0.9
    form='okddip' (the repo): L = CE(z_s, y) + alpha * KL_T(z_t -> z_s)                    alpha = 1

KL_T includes T^2; T = 3 (the repo's default). The repo also adds 1e-7 to the teacher's probabilities inside
KL_T: its full form is ``form=okddip target_eps=1e-7`` (``target_eps`` defaults to 0, the Hinton form).
``alpha: null`` picks the form's default above (0.9 for the Hinton form is this library's choice; the
sources leave it open). The teacher is ``create_model(teacher_model)``
loaded from ``teacher_checkpoint``: an okd ``deploy.pt`` or a plain state_dict file (optionally under a
``state_dict``/``model``/``net`` key, ``module.`` prefixes stripped) or an ``okd export --format
safetensors`` file, read with ``weights_only=True`` (a pickled object is refused, never run). Its outputs are
computed under no-grad, it never leaves eval mode and is in no optimizer group; a checkpoint that does not fit
``teacher_model`` (or the student's class count) raises :class:`~okd.errors.CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from okd.errors import CheckpointError, ConfigError
from okd.io import load_checkpoint
from okd.methods.base import Method, MethodContext, ParamGroup, register_method, sgd_group
from okd.methods.branch_base import check_choice, check_distillation
from okd.models import create_model
from okd.models.deploy_file import check_class_count, read_deploy
from okd.models.members import check_member, entry_spec, member_entry
from okd.models.spec import build_from_spec, spec_ref
from okd.nn.losses import cross_entropy, kl_div_t

FORM_ALPHA = {"hinton": 0.9, "okddip": 1.0}


@dataclass
class KDParams:
    #: the teacher's network, in any form of a model.members entry: a registered name (e.g. resnet110_bottleneck,
    #: the OKDDip README's teacher for ResNet-32), package.module:function, timm:<name>, or a mapping with the
    #: model section's keys ({name: ..., kwargs: ...}); docs/cohorts.md
    teacher_model: Any = ""
    #: path of the teacher's okd deploy.pt or state_dict file
    teacher_checkpoint: str = ""
    #: hinton: (1-alpha) CE + alpha KL | okddip: CE + alpha KL
    form: str = "hinton"
    #: null: 0.9 (hinton) or 1.0 (okddip)
    alpha: float | None = None
    temperature: float = 3.0
    #: added to the teacher's probabilities inside KL_T (the OKDDip repo: 1e-7)
    target_eps: float = 0.0

    def validate(self) -> None:
        if not self.teacher_model:
            raise ConfigError("method.teacher_model is required for kd (a model name, e.g. resnet110_bottleneck)")
        check_member(member_entry(self.teacher_model, "method.teacher_model"), "method.teacher_model")
        if not self.teacher_checkpoint:
            raise ConfigError(
                "method.teacher_checkpoint is required for kd: the teacher's deploy.pt (from `okd train` of "
                "the teacher) or a state_dict file"
            )
        check_choice("form", self.form, tuple(FORM_ALPHA))
        check_distillation(self.temperature, 0.0, 0, self.target_eps)
        if self.alpha is not None and not 0.0 <= self.alpha <= (1.0 if self.form == "hinton" else float("inf")):
            bound = "[0, 1]" if self.form == "hinton" else ">= 0"
            raise ConfigError(f"method.alpha must be {bound} for form={self.form}, got {self.alpha}")

    @property
    def effective_alpha(self) -> float:
        return FORM_ALPHA[self.form] if self.alpha is None else float(self.alpha)


TEACHER = "teacher checkpoint (method.teacher_checkpoint)"


def _teacher_hint(model: str) -> str:
    return (
        f"Give the teacher as its run's deploy.pt (runs/<teacher>/deploy.pt, written by `okd train` with "
        f"model.name={model}), its `okd export --format safetensors` file, or a file holding a plain "
        "state_dict (a mapping of parameter names to tensors)."
    )


def _extract_state_dict(obj: object, path: str, model: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("okd-run"):
        raise CheckpointError(
            f"{TEACHER} {path!r} is an okd run checkpoint (last.pt/best.pt), not a network. {_teacher_hint(model)}"
        )
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{TEACHER} {path!r} holds no state_dict (a mapping of parameter names to tensors). {_teacher_hint(model)}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_teacher(model: str, num_classes: int, checkpoint: str) -> nn.Module:
    """``create_model(model, num_classes)`` with the checkpoint's weights, frozen and in eval mode. A plain name
    is built as the checkpoint's ``model_spec`` says when it records one of that name (the teacher as its run
    built it: kwargs, taps); a :class:`~okd.models.spec.ModelRef` (the teacher given as a mapping) as it says."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} (method.teacher_checkpoint) does not exist; train the teacher "
            f"first (an `okd train` run of model.name={model} writes runs/<name>/deploy.pt) or set "
            "method.teacher_checkpoint=PATH to a deploy.pt or state_dict file"
        )
    if path.suffix == ".safetensors":
        obj = read_deploy(path, TEACHER)
    else:
        obj = load_checkpoint(path, what=TEACHER, hint=_teacher_hint(model))
    saved_model = obj.get("model") if isinstance(obj.get("model"), str) else None
    if saved_model is not None and saved_model != model:
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} holds a {saved_model}, but method.teacher_model={model}"
        )
    if isinstance(obj.get("num_classes"), int):
        check_class_count(obj["num_classes"], num_classes, path, "the student's data set")
    state = _extract_state_dict(obj, str(path), model)
    spec = obj.get("model_spec")
    same = not hasattr(model, "spec") and isinstance(spec, dict) and spec.get("name") == model  # as its run built it
    teacher = build_from_spec(spec, num_classes) if same else create_model(model, num_classes)
    own = teacher.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {items[:3]}" for what, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items
        )  # fmt: skip
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} does not match method.teacher_model={model} with "
            f"{num_classes} classes ({detail}); check the teacher's model name and dataset"
        )
    teacher.load_state_dict(state)
    teacher.requires_grad_(False)
    return teacher.eval()


@register_method(
    "kd",
    description="classic KD: a student learns from a frozen pre-trained teacher (Hinton form; OKDDip-repo form)",
    paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv 1503.02531",
)
class KD(Method):
    Params = KDParams
    deploy_head = "student"
    mixed_cohort = (
        "it trains one student (the model section, or a model.members of one entry) from a fixed teacher; the "
        "teacher may be any network (method.teacher_model)"
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.student = create_model(ctx.model, ctx.num_classes)
        given = self.hp.teacher_model
        teacher = str(given)
        if isinstance(given, Mapping):  # its own kwargs, taps, ...: built as the mapping says
            teacher = spec_ref(entry_spec(member_entry(given, "method.teacher_model"), ctx.input_size))
        self.teacher = load_teacher(teacher, ctx.num_classes, self.hp.teacher_checkpoint)

    def train(self, mode: bool = True) -> KD:
        super().train(mode)
        self.teacher.eval()
        return self

    def param_groups(self) -> list[ParamGroup]:
        return [sgd_group("student", self.student.parameters(), self.ctx.optim)]

    def training_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        hp: KDParams = self.hp
        with torch.no_grad():
            z_t = self.teacher(images)
        z_s = self.student(images)
        alpha = hp.effective_alpha
        ce_weight = 1.0 - alpha if hp.form == "hinton" else 1.0
        kl = kl_div_t(z_s, z_t, hp.temperature, detach_target=True, target_eps=hp.target_eps)
        return {"student/ce": ce_weight * cross_entropy(z_s, labels), "student/kl": alpha * kl}

    def eval_outputs(self, images: Tensor) -> dict[str, Tensor]:
        return {"student": self.student(images), "teacher": self.teacher(images)}

    def deployable(self) -> nn.Module:
        return self.student
