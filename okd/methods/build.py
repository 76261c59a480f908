"""From a resolved config to a method: the typed :class:`~okd.config.Config` (the run sections plus the method's
own ``Params``) and the method object itself. It sits above the registered methods, so the schema
(:mod:`okd.config`) never imports them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from okd.config import (
    Config,
    RunConfig,
    check_finite,
    compose,
    load_raw,
    parse_overrides,
    typed_section,
    validate_run,
)
from okd.errors import ConfigError
from okd.methods.base import METHODS, Method, MethodContext
from okd.methods.cohort import check_cohort, fill_cohort_size, member_refs
from okd.models.spec import check_model_config, input_size_of, model_ref


def build_config(raw: DictConfig | dict) -> Config:
    """Validate a raw mapping into a :class:`Config`: the run sections, then ``method.*`` against the method's
    ``Params``."""
    raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    method_raw = raw.pop("method", None) or {}
    if not isinstance(method_raw, dict):
        raise ConfigError("the method section must be a mapping, e.g. method: {name: ffsd}")
    method_raw = dict(method_raw)
    name = method_raw.pop("name", "baseline")
    method_cls = METHODS.get(name)
    run = typed_section(RunConfig, raw, "")
    validate_run(run)
    method_raw = fill_cohort_size(run.model, method_cls, method_raw)  # checks the members first
    check_model_config(run.model)
    params = typed_section(method_cls.Params, method_raw, "method")
    check_finite(params, "method.")
    check = getattr(params, "validate", None)
    if check is not None:
        check()
    check_cohort(run, name, method_cls, params)
    return Config(run=run, method_name=name, method_params=params)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (a file or a packaged name) under its recipe, apply ``key=value`` overrides and
    validate everything (:func:`okd.config.compose`: typed defaults < recipe < file < overrides)."""
    raw = compose(load_raw(path), parse_overrides(list(overrides)))
    return build_config(raw)


def build_method(cfg: Config, num_classes: int) -> Method:
    """The method ``cfg`` names, with its networks built for ``num_classes`` classes (weights untrained)."""
    cls = METHODS.get(cfg.method_name)
    members = member_refs(cfg)
    ctx = MethodContext(
        model=model_ref(cfg) if members is None else members[0],
        num_classes=num_classes,
        optim=cfg.run.optim,
        params=cfg.method_params,
        epochs=cfg.run.train.epochs,
        extra={"holdout": cfg.run.data.holdout, "input_size": input_size_of(cfg.run.data)},
        members=members,
    )
    return cls(ctx)


def method_class(name: str) -> type[Method] | None:
    """The registered method class ``name``, or None (a report then works from the run's files alone)."""
    return METHODS.get(name) if name in METHODS else None


def method_defaults(name: str) -> dict | None:
    """The default method parameters of ``name`` (its ``Params`` dataclass), or None if unknown."""
    cls = method_class(name)
    if cls is None:
        return None
    try:
        return dataclasses.asdict(cls.Params())
    except TypeError:  # a Params without defaults for every field
        return None
