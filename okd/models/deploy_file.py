"""Reading a ``deploy.pt`` (the deployable network of a run) and rebuilding its network: the one place that does.

A deploy file is a dict of plain values and tensors (loaded with ``weights_only=True``): ``format``
(``okd-deploy-v1``), ``model`` (the model name), ``num_classes``, ``state_dict``, and optionally
``method``, ``epoch``, ``dataset``, ``classes``, ``mean``, ``std``, ``size``, ``resize``, ``model_spec`` (how to
rebuild a network that is not a registered backbone with defaults: :mod:`okd.models.spec`) and ``head`` (the
head that scored it; written for a member of a ``model.members`` cohort, whose ``model`` and ``model_spec``
describe that member: docs/cohorts.md). A ``.safetensors``
file (``okd export --format safetensors``) holds the same: the tensors, and the rest as the JSON of its
``okd`` metadata entry; :func:`read_deploy` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from okd.errors import CheckpointError, ConfigError
from okd.extras import require
from okd.io import load_checkpoint, load_state_checked, require_keys
from okd.models.factory import create_model
from okd.models.spec import build_from_spec, check_stored_config

DEPLOY_FORMAT = "okd-deploy-v1"
DEPLOY_HINT = "Give a run's deploy.pt, a run folder, or a file written by `okd export`."


def read_deploy(path: str | Path, what: str = "deploy file") -> dict:
    """The checked contents of a deploy file or ``.safetensors`` export (format, model name, class count,
    tensors)."""
    ckpt = read_safetensors(path, what) if Path(path).suffix == ".safetensors" else None
    if ckpt is None:
        ckpt = load_checkpoint(path, what=what, hint=DEPLOY_HINT)
    if ckpt.get("format") != DEPLOY_FORMAT:
        raise CheckpointError(f"{what} {str(path)!r} is not a deploy.pt (format {ckpt.get('format')!r}). {DEPLOY_HINT}")
    require_keys(ckpt, ("model", "num_classes", "state_dict"), path, what)
    if not isinstance(ckpt["model"], str) or not isinstance(ckpt["num_classes"], int) or ckpt["num_classes"] <= 0:
        raise CheckpointError(
            f"{what} {str(path)!r} has a malformed header (model={ckpt['model']!r}, "
            f"num_classes={ckpt['num_classes']!r}). {DEPLOY_HINT}"
        )
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {str(path)!r}: its state_dict is not a mapping of names to tensors")
    return ckpt


def safetensors_metadata(info: dict) -> dict[str, str]:
    """The ``okd`` metadata entry of a safetensors export: every header field but the tensors, as JSON."""
    return {"okd": json.dumps({k: v for k, v in info.items() if k != "state_dict"})}


def read_safetensors(path: str | Path, what: str = "deploy file") -> dict:
    """A ``.safetensors`` export as a deploy dict (no pickle involved: tensors and a JSON header)."""
    require("safetensors", "safetensors")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("okd") or "{}")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncation
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read as safetensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); it is truncated or not a safetensors file"
        ) from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(
            f"{what} {str(path)!r} has no okd metadata (model, num_classes); it was not written by "
            "`okd export --format safetensors`. Load it with safetensors.torch.load_file into your own network."
        )
    return {**meta, "state_dict": state}


def check_class_count(num_classes: int, expected: int, path: str | Path, expected_from: str) -> None:
    """Fail naming both counts when a network of ``num_classes`` outputs is used where ``expected`` are."""
    if num_classes != expected:
        raise CheckpointError(
            f"{str(path)!r} holds a {num_classes}-class network, but {expected_from} has {expected} classes; "
            "give the deploy.pt trained on this data set (or the run folder it belongs to)"
        )


def build_network(info: dict, path: str | Path, what: str = "deploy file") -> nn.Module:
    """``create_model(info['model'], info['num_classes'])`` with the file's weights, checked: a ``model`` field
    that does not match the weights is named as such (not a raw ``load_state_dict`` error)."""
    spec = info.get("model_spec")  # how the run built its network (okd.models.spec.model_spec), when recorded
    if not isinstance(spec, dict) or spec.get("name") != info["model"]:
        spec = None  # none recorded, or a file edited by hand: the model field rules
    if isinstance(spec, dict):
        check_stored_config({"model": spec})  # the user's own code is imported only with their consent
    try:
        if isinstance(spec, dict):
            net = build_from_spec(spec, int(info["num_classes"]), from_file=True)
        else:
            net = create_model(info["model"], int(info["num_classes"]))
    except ConfigError as exc:
        raise CheckpointError(
            f"{what} {str(path)!r} names model {info['model']!r}, which okd cannot build: {exc}"
        ) from None
    try:
        load_state_checked(net, info["state_dict"], f"the weights of {what} {str(path)!r}")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{what} {str(path)!r} says model={info['model']!r} with {info['num_classes']} classes, but its "
            f"weights are not that network's: {exc}. The file was edited or assembled by hand; use the deploy.pt "
            "the run wrote (or rewrite it with `okd export RUN --format state_dict`)."
        ) from None
    return net
