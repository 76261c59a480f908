"""The cohort a config asks for (``model.members``), whether its method can train it, and which network it deploys.

:func:`fill_cohort_size` and :func:`check_cohort` run inside :func:`okd.methods.build.build_config`, so a mixed
cohort that the method cannot take is refused with the method's reason (``Method.mixed_cohort``) before any
data is read. :func:`member_refs` gives the methods their networks (``MethodContext.members``);
:func:`deployed_spec` tells ``deploy.pt`` which member it holds. The user's side: docs/cohorts.md.
"""

from __future__ import annotations

from typing import Any

from okd.config import ModelConfig, RunConfig
from okd.errors import ConfigError
from okd.methods.base import METHODS, Method
from okd.models.members import entry_spec, is_mixed, member_entries, member_labels
from okd.models.spec import input_size_of, spec_ref

#: model-section keys that describe model.name alone; with model.members each member carries its own
_SECTION_KEYS = ("kwargs", "taps", "branch_from", "pretrained", "weights")


def fill_cohort_size(model: ModelConfig, method_cls: type[Method], method_raw: dict) -> dict:
    """``method_raw`` with the method's cohort size (``cohort_key``) set to the number of members when the config
    leaves it out; checks the members themselves and the model section beside them."""
    entries = member_entries(model.members)
    if entries is None:
        return method_raw
    defaults = ModelConfig()
    for key in _SECTION_KEYS:
        if getattr(model, key) != getattr(defaults, key):
            raise ConfigError(
                f"model.{key} describes model.name, which model.members replaces; give it per member, e.g. "
                f"members: [resnet32, {{name: my_nets.cnn:build, {key}: ...}}]"
            )
    key = method_cls.cohort_key
    if key is not None and method_raw.get(key) is None:
        return {**method_raw, key: len(entries)}
    return method_raw


def cohort_entries(run: RunConfig, method_cls: type[Method], params: Any) -> list[dict] | None:
    """The cohort's entries, full and checked: ``model.members``, or the method's own older spelling of it
    (``members_key``: KDCL's ``method.models``); None for copies of the model section."""
    entries = member_entries(run.model.members)
    alias = getattr(params, method_cls.members_key) if method_cls.members_key else None
    if alias:
        where = f"method.{method_cls.members_key}"
        if entries is not None:
            raise ConfigError(
                f"{where} is the older spelling of model.members; give the cohort once, as model.members "
                f"(got model.members={list(run.model.members)} and {where}={list(alias)})"
            )
        return member_entries(list(alias), where)
    return entries


def accepting_methods() -> list[str]:
    """The registered methods that train a cohort of different networks."""
    return [n for n in METHODS.names() if METHODS.get(n).mixed_cohort is None]


def check_cohort(run: RunConfig, name: str, method_cls: type[Method], params: Any) -> None:
    """Refuse a cohort the method cannot build: a member count other than its cohort size, or different
    networks where its structure needs copies of one (with the method's reason)."""
    entries = cohort_entries(run, method_cls, params)
    if entries is None:
        return
    if is_mixed(entries) and method_cls.mixed_cohort is not None:
        raise ConfigError(
            f"{name} cannot train a cohort of different networks (model.members: {', '.join(member_labels(entries))})"
            f": {method_cls.mixed_cohort}. Give it copies of one network, or train the mixed cohort with "
            f"{', '.join(accepting_methods())}"
        )

    size = method_cls.cohort_size(params)
    if len(entries) != size:
        if method_cls.cohort_key:
            key = f"method.{method_cls.cohort_key}"
            raise ConfigError(
                f"model.members lists {len(entries)} networks, but {key}={size}; leave {key} out (it follows "
                "model.members) or make them agree"
            )
        raise ConfigError(
            f"model.members lists {len(entries)} networks, but {name} builds {size} from the model section"
        )


def member_refs(cfg) -> list[str] | None:
    """``model.members`` as the networks a method builds (``MethodContext.members``), or None."""
    entries = member_entries(cfg.run.model.members)
    if entries is None:
        return None
    size = input_size_of(cfg.run.data)
    return [spec_ref(entry_spec(e, size)) for e in entries]


def deployed_spec(cfg, method: Method) -> dict | None:
    """The model spec of the network ``method.deployable()`` returns when the cohort is given by members (the
    method's ``deployed_member``; any member of copies), or None: the model section describes it."""
    cls = METHODS.get(cfg.method_name)
    entries = cohort_entries(cfg.run, cls, cfg.method_params)
    if entries is None:
        return None
    index = method.deployed_member if is_mixed(entries) else 0
    if index is None:
        raise ValueError(f"{cfg.method_name} trains a mixed cohort but does not say which member it deploys")
    return entry_spec(entries[index], input_size_of(cfg.run.data))
