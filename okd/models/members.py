"""A cohort of different networks: the entries of ``model.members``, checked and described (docs/cohorts.md).

An entry names one network the way the model section does: a string (a registered name, an import path
``package.module:function`` or ``timm:<name>``), or a mapping with the model section's keys (``name``, ``kwargs``,
``taps``, ``branch_from``, ``pretrained``, ``weights``). :func:`member_entry` turns either into the full mapping,
:func:`check_member` checks it before any data is read (an unknown registered name lists the registered ones),
and :func:`entry_spec` gives the :func:`~okd.models.spec.model_spec` of the network it names. Which method may
take which cohort is decided above, in :mod:`okd.methods.cohort`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from okd.errors import ConfigError
from okd.models.registry import MODELS
from okd.models.spec import check_model_config, model_kind, section_spec

#: the keys of a mapping entry (the model section's, but members itself)
MEMBER_KEYS = ("name", "kwargs", "taps", "branch_from", "pretrained", "weights")
_FORMS = (
    "a registered name (okd models lists them), an import path package.module:function, timm:<name>, or a mapping "
    f"with the model section's keys ({', '.join(MEMBER_KEYS)})"
)


def member_entry(entry: Any, where: str) -> dict[str, Any]:
    """The full mapping of one entry (every key of :data:`MEMBER_KEYS`, defaults filled), its types checked."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}={entry!r} is not a network; give {_FORMS}")
    unknown = [str(k) for k in entry if k not in MEMBER_KEYS]
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; valid keys: {', '.join(MEMBER_KEYS)}")
    out = {"name": entry.get("name"), "kwargs": entry.get("kwargs") or {}, "taps": entry.get("taps")}
    out.update(branch_from=entry.get("branch_from"), pretrained=entry.get("pretrained", False))
    out["weights"] = entry.get("weights")
    if not isinstance(out["name"], str) or not out["name"].strip():
        raise ConfigError(f"{where} needs a name: {_FORMS}")
    if not isinstance(out["kwargs"], Mapping) or not all(isinstance(k, str) for k in out["kwargs"]):
        raise ConfigError(f"{where}.kwargs must be a mapping of keyword arguments, got {out['kwargs']!r}")
    taps = out["taps"]
    if taps is not None and (not isinstance(taps, list | tuple) or not all(isinstance(t, str) for t in taps)):
        raise ConfigError(f"{where}.taps must be a list of submodule names, got {taps!r}")
    for key in ("branch_from", "weights"):
        if out[key] is not None and not isinstance(out[key], str):
            raise ConfigError(f"{where}.{key} must be a string or null, got {out[key]!r}")
    if not isinstance(out["pretrained"], bool):
        raise ConfigError(f"{where}.pretrained must be true or false, got {out['pretrained']!r}")
    out["kwargs"] = dict(out["kwargs"])
    out["taps"] = list(taps) if taps is not None else None
    return out


def check_member(entry: dict[str, Any], where: str) -> None:
    """What can be checked of one full entry before any data is read: the model section's rules, a registered
    name that exists, an import path of the form ``package.module:function`` (it is imported when built)."""
    check_model_config(SimpleNamespace(**entry), where)
    name, kind = entry["name"], model_kind(entry["name"])
    if kind == "registered" and name not in MODELS:
        raise ConfigError(f"{where}: unknown model {name!r}; choose one of: {', '.join(MODELS.names())}")
    module, _, attr = name.partition(":")
    if kind == "import" and (not module or not attr or ":" in attr):
        raise ConfigError(f"{where}={name!r} is not an import path of the form package.module:function")


def member_entries(members: list | None, where: str = "model.members") -> list[dict[str, Any]] | None:
    """Every entry of a members list, full and checked (None stays None: copies of the model section)."""
    if members is None:
        return None
    if isinstance(members, str | Mapping) or not isinstance(members, list | tuple):
        raise ConfigError(f"{where} must be a list of networks (e.g. [resnet32, wrn16_2]), got {members!r}")
    if not members:
        raise ConfigError(f"{where} is empty; list the cohort's networks, or leave it out for copies of model.name")
    entries = [member_entry(e, f"{where}[{i}]") for i, e in enumerate(members)]
    for i, e in enumerate(entries):
        check_member(e, f"{where}[{i}]")
    return entries


def entry_spec(entry: dict[str, Any], input_size: int) -> dict[str, Any]:
    """The :func:`~okd.models.spec.model_spec` of the network a full entry names."""
    return section_spec(SimpleNamespace(**entry), input_size)


def _key(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


def is_mixed(entries: list[dict[str, Any]] | None) -> bool:
    """The entries name more than one distinct network (equal entries are copies of one network)."""
    return entries is not None and len({_key(e) for e in entries}) > 1


def member_labels(entries: list[dict[str, Any]]) -> list[str]:
    """One short label per entry: its name, with its kwargs where another entry has the same name."""
    labels = []
    for e in entries:
        twins = {_key(o) for o in entries if o["name"] == e["name"]}
        extra = ", ".join(f"{k}={v}" for k, v in sorted(e["kwargs"].items()))
        labels.append(f"{e['name']}({extra})" if len(twins) > 1 and extra else str(e["name"]))
    return labels


def cohort_label(model: dict) -> str:
    """A stored model section (a dict) in one phrase: ``model.name``, or its members joined by ``+``."""
    members = (model or {}).get("members")
    if not members:
        return str((model or {}).get("name", "?"))
    try:
        entries = [member_entry(e, "model.members") for e in members]
    except ConfigError:
        return "+".join(str(e) for e in members)
    return "+".join(member_labels(entries)) if is_mixed(entries) else str(entries[0]["name"])


def ref_entry(ref: str) -> dict[str, Any]:
    """The full entry of a network as methods hold it (a name, or a :class:`~okd.models.spec.ModelRef`)."""
    spec = getattr(ref, "spec", None)
    if spec is None:
        return member_entry(str(ref), "network")
    return {k: spec.get(k) if k != "kwargs" else dict(spec.get(k) or {}) for k in MEMBER_KEYS}


def head_labels(heads: list[str], refs: list[str]) -> dict[str, str]:
    """``{head: label}`` for the per-network heads of a cohort built from ``refs`` (in order) when they are not
    all copies of one network; ``{}`` when they are."""
    entries = [ref_entry(r) for r in refs]
    return dict(zip(heads, member_labels(entries), strict=True)) if is_mixed(entries) else {}
