"""How a run names its network, and the one function that builds it from that description.

``model.name`` is one of three kinds:

- a registered backbone (``resnet32``; ``okd models`` lists them);
- an import path ``package.module:function`` to the user's own factory, called as
  ``function(num_classes=K, **model.kwargs)`` and returning an ``nn.Module`` that maps images to logits;
- ``timm:<name>`` (any timm model; the ``okd[timm]`` extra), built with ``pretrained=False`` unless
  ``model.pretrained=true`` with a local ``model.weights`` file (nothing is downloaded).

:func:`model_spec` turns a config into a plain dict (str, int, bool, list, dict: safe to store in ``deploy.pt``
and to load with ``weights_only=True``); :func:`build_from_spec` rebuilds the network from it (training,
``okd export``/``predict``/``attention`` and KD teachers all go through it). :class:`ModelRef` is the model name
with that spec attached, so methods keep calling ``create_model(ctx.model, K)``.

Importing a user's module runs its code. A config names the module itself, so training imports it; a spec
read back from a file (``deploy.pt``, a run folder) is imported only when the user allows that module:
``OKD_ALLOW_IMPORT=module[,module...]`` (a module or a package prefix), see :func:`check_import_allowed`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from okd.data.folder import geometry, image_size_of, preprocessing
from okd.errors import ConfigError, DataError
from okd.models.external import ExternalNet, TappedNet, call_factory, load_factory
from okd.models.registry import MODELS
from okd.models.staged import StagedNet, TappedStagedNet
from okd.models.timm_models import create_timm, with_default_taps

TIMM_PREFIX = "timm:"
ALLOW_ENV = "OKD_ALLOW_IMPORT"
#: input side of the probe forward per built-in dataset (folder data: data.image_size)
_INPUT_SIZE = {"cifar10": 32, "cifar100": 32, "tinyimagenet": 64, "imagenet": 224}


def model_kind(name: str) -> str:
    """``registered`` | ``timm`` | ``import``."""
    if name.startswith(TIMM_PREFIX):
        return "timm"

    if name in MODELS or ":" not in name:
        return "registered"
    return "import"


class ModelRef(str):
    """A model name (compares and prints as ``model.name``) that carries its full :func:`model_spec`."""

    spec: dict[str, Any]

    def __new__(cls, spec: dict[str, Any]) -> ModelRef:
        ref = super().__new__(cls, spec["name"])
        ref.spec = dict(spec)
        return ref

    def __reduce__(self):
        return (ModelRef, (self.spec,))


def input_size_of(data_cfg) -> int:
    """The image side the run feeds its network (the probe's size)."""
    if data_cfg.dataset == "folder":
        return image_size_of(data_cfg)
    return _INPUT_SIZE.get(data_cfg.dataset, 32)


def model_spec(cfg) -> dict[str, Any]:
    """The plain-types description of the run's network (``deploy.pt`` key ``model_spec``)."""
    return section_spec(cfg.run.model, input_size_of(cfg.run.data))


def section_spec(m, input_size: int) -> dict[str, Any]:
    """The spec of a model section or of one ``model.members`` entry (anything with the section's attributes)."""
    spec: dict[str, Any] = {"name": str(m.name), "kind": model_kind(m.name), "kwargs": dict(m.kwargs or {})}
    spec["taps"] = list(m.taps) if m.taps is not None else None
    spec["branch_from"] = m.branch_from
    spec["pretrained"] = bool(m.pretrained)
    spec["weights"] = m.weights
    spec["input_size"] = int(input_size)
    return spec


def model_ref(cfg) -> str:
    """``model.name`` for the method context: a plain str for a registered backbone built with defaults,
    else a :class:`ModelRef` carrying the spec."""
    return spec_ref(model_spec(cfg))


def spec_ref(spec: dict[str, Any]) -> str:
    """A spec as methods pass it to ``create_model``: the plain name for a registered backbone with its defaults,
    else a :class:`ModelRef`."""
    plain = spec["kind"] == "registered" and not spec["kwargs"] and spec["taps"] is None
    return str(spec["name"]) if plain and spec["branch_from"] is None else ModelRef(spec)


def check_model_config(m, where: str = "model") -> None:
    """What can be checked of the model section (a ``ModelConfig``), or of one ``model.members`` entry (``where``
    names it), before any data is read."""
    kind = model_kind(m.name)
    if kind == "registered":
        if m.taps is not None or m.branch_from is not None:
            raise ConfigError(
                f"{where}.taps and {where}.branch_from are for your own or timm networks; the registered {m.name} "
                "has its taps and branch split built in"
            )
        if m.pretrained or m.weights:
            raise ConfigError(f"{where}.pretrained/{where}.weights are for timm: models")
    if kind == "import" and (m.pretrained or m.weights):
        raise ConfigError(
            f"{where}.pretrained/{where}.weights are for timm: models; load your own weights in your factory"
        )
    if m.pretrained and not m.weights:
        raise ConfigError(
            f"{where}.pretrained=true needs {where}.weights=PATH, a local weights file of that timm model "
            "(okd downloads nothing at run time)"
        )
    if m.weights and not m.pretrained:
        raise ConfigError(f"{where}.weights is read only with {where}.pretrained=true")


def check_import_allowed(path: str) -> None:
    """Refuse to import the module of ``path`` unless ``OKD_ALLOW_IMPORT`` names it (or a package above it)."""
    module = path.partition(":")[0]
    allowed = [a.strip() for a in os.environ.get(ALLOW_ENV, "").split(",") if a.strip()]
    if any(module == a or module.startswith(a + ".") for a in allowed):
        return
    raise ConfigError(
        f"this network is built by your code {path!r}; okd imports it only when you allow that module: "
        f"set {ALLOW_ENV}={module} (comma-separated modules or packages) and make it importable (PYTHONPATH). "
        "Importing a module runs its code, so allow only code you trust"
    )


#: the method keys that name networks in a stored config (KDCL's older spelling of model.members, KD's teacher)
METHOD_NETWORK_KEYS = ("models", "teacher_model")


def stored_network_names(config: dict) -> list[str]:
    """Every network name a stored config holds: ``model.name``, each ``model.members`` entry's and those of the
    method keys that name networks (:data:`METHOD_NETWORK_KEYS`)."""
    model, method = (config or {}).get("model") or {}, (config or {}).get("method") or {}
    entries = [model.get("name")] + list(model.get("members") or [])
    for key in METHOD_NETWORK_KEYS:
        value = method.get(key)
        entries += list(value) if isinstance(value, list | tuple) else [value]
    names = [e.get("name") if isinstance(e, dict) else e for e in entries]
    return [str(n) for n in names if isinstance(n, str) and n]


def check_stored_config(config: dict) -> None:
    """A run's stored config (``last.pt``) read back by resume, ``okd test``, export, ... names its networks:
    an import path there is imported only with the user's consent (:func:`check_import_allowed`)."""
    for name in stored_network_names(config):
        if model_kind(name) == "import":
            check_import_allowed(name)


def build_from_spec(spec: dict[str, Any], num_classes: int, *, from_file: bool = False) -> nn.Module:
    """Build the network a :func:`model_spec` describes, with a ``num_classes``-way classifier.

    ``from_file``: the spec was read from a file (not the user's config): import paths need
    :func:`check_import_allowed`.
    """
    name, kind = str(spec["name"]), spec.get("kind") or model_kind(str(spec["name"]))
    kwargs, taps, size = dict(spec.get("kwargs") or {}), spec.get("taps"), int(spec.get("input_size") or 32)
    if kind == "registered":
        return MODELS.get(name)(num_classes=num_classes, **kwargs)

    if kind == "import":
        if from_file:
            check_import_allowed(name)
        user = call_factory(load_factory(name), num_classes, kwargs, f"model.name={name!r}")
    elif kind == "timm":
        user = create_timm(name[len(TIMM_PREFIX) :], num_classes, kwargs, spec)
    else:
        raise ConfigError(f"unknown model kind {kind!r} in the stored model spec of {name!r}")
    if spec.get("branch_from"):  # with taps too (one_sl: ONE's branches and a leader that reads a tap)
        staged = TappedStagedNet if taps else StagedNet
        return staged(user, num_classes, spec["branch_from"], taps=taps, name=name, input_size=size)
    if taps:
        return TappedNet(user, num_classes, taps, name=name, input_size=size)
    if kind == "timm":
        return with_default_taps(user, num_classes, name, size)
    return ExternalNet(user, num_classes, name=name, input_size=size)


def deploy_fields(cfg, train_loader=None, classes: list[str] | None = None) -> dict[str, Any]:
    """What ``deploy.pt`` records beyond the weights so the network can be rebuilt and fed (plain types):
    ``model_spec`` always; for folder datasets also the class names, input size, test resize and the
    normalisation the run used (``data.compute_stats`` computes it, so the config alone cannot tell), from the
    run's ``train_loader`` and ``classes``, or (a deploy.pt rebuilt from last.pt) from the dataset itself when
    it is still there."""
    out: dict[str, Any] = {"model_spec": model_spec(cfg)}
    data = cfg.run.data
    if data.dataset in ("folder", "imagenet", "tinyimagenet"):
        if train_loader is None:
            try:
                classes, mean, std = preprocessing(data)
            except DataError:
                return out  # the data moved: predict falls back to the run's config for these
        else:
            mean, std = list(train_loader.mean), list(train_loader.std)
        size, resize, _ = geometry(data)
        out.update({"dataset": data.dataset, "classes": [str(c) for c in classes], "size": size, "resize": resize})
        out.update({"mean": list(mean), "std": list(std)})
    return out
