"""The config schema: typed dataclass defaults, recipes, short YAML files and ``key=value`` overrides.

This module holds the run sections (data, model, optim, train), their checks, and how a named recipe joins
them (:func:`compose`: typed defaults < recipe < the config file < overrides; docs/recipes.md). Building a
:class:`Config` with the method's own typed ``Params`` (an unknown ``method.*`` key fails before training with
the valid keys named) sits above the methods: :func:`okd.methods.build.build_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from okd.configs import close_configs, read_recipe, recipe_names, resolve_config
from okd.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "cifar100"  # cifar10 | cifar100 | imagenet | tinyimagenet | folder (root/train, root/val)
    root: str = "data"  # the folder holding the data set (CIFAR: downloaded into it when missing)
    download: bool = True  # CIFAR: download (MD5-checked) when missing from data.root
    pad: int = 4  # pixels of padding before the random crop (CIFAR, pad_crop)
    padding_mode: str = "reflect"  # reflect | zeros
    flip: bool = True  # random horizontal flips in training
    mean: list[float] | None = None  # None: the dataset's standard statistics
    std: list[float] | None = None  # per channel, R, G, B, like data.mean
    batch_size: int = 128  # the global training batch (split over processes under torchrun)
    test_batch_size: int = 500  # evaluation batch (evaluation only)
    drop_last: bool = False  # drop the last, smaller training batch of each epoch
    limit_train: int | None = None  # first N training images (quick runs and tests)
    limit_test: int | None = None  # first N test images
    holdout: int = 0  # last N training images withheld from training, un-augmented (KDCL "general")
    #: DataLoader workers (ImageNet-style folders only; CIFAR lives on the device); null: what the machine has,
    #: min(8, usable cores - 1) (okd.data.folder.loader.default_workers)
    workers: int | None = None
    pin_memory: bool = True  # DataLoader pinned memory (ImageNet-style folders)
    skip_unreadable: bool = False  # folders: skip (and report) unreadable images instead of failing
    # data.dataset=folder only (imagenet/tinyimagenet are fixed presets of it):
    image_size: int = 224  # the side of the square crops the network sees
    resize: int | None = None  # test: shorter side resized to this before the centre crop (None: image_size*8/7)
    train_crop: str = "random_resized"  # random_resized (ImageNet) | pad_crop (resize, data.pad, random crop) | center
    compute_stats: bool = False  # mean/std from the training split (overrides data.mean/std), once per run
    in_memory: bool = False  # decode once at image_size and keep on the device (pad_crop/center; small datasets)
    #: random (a shuffled pass over the split) | m_per_class (MCL/L-MCL: len(split) // batch_size independent
    #: batches, each batch_size / m_per_class random classes with m_per_class distinct images each; CIFAR only)
    sampler: str = "random"
    m_per_class: int = 2  # images per class in a batch of data.sampler=m_per_class


@dataclass
class ModelConfig:
    #: a registered backbone (okd models), your factory by import path (package.module:function) or timm:<name>
    name: str = "resnet32"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the factory
    taps: list[str] | None = None  # submodules whose outputs are the feature taps (FFSD, DML-leader, ...)
    branch_from: str | None = None  # branch methods: the first stage that is replicated per branch
    pretrained: bool = False  # timm: load model.weights (a local file; nothing is downloaded)
    weights: str | None = None  # timm: the local weights file model.pretrained loads
    #: the cohort, network by network (null: copies of the network above). Each entry is a name of the three
    #: kinds model.name takes, or a mapping with this section's keys ({name: ..., kwargs: ..., taps: ...});
    #: docs/cohorts.md. Methods whose structure needs equal networks refuse different members before training.
    members: list[Any] | None = None


@dataclass
class OptimConfig:
    lr: float = 0.1  # the SGD learning rate of every network (methods may give their own modules another)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # SGD weight decay (L2, coupled)
    milestones: list[int] = field(default_factory=lambda: [150, 225])  # epochs after which the lr is x gamma
    gamma: float = 0.1  # the lr factor at each milestone
    schedule: str = "multistep"  # multistep | ffsd_imagenet_code | ffsd_imagenet_paper | cosine (per epoch)
    warmup_epochs: int = 0  # ffsd_imagenet_paper: epochs of linear lr warm-up
    lr_scaling: str = "none"  # none | linear: every group's lr x data.batch_size / reference_batch
    reference_batch: int = 128  # the batch optim.lr is given for (optim.lr_scaling=linear)


@dataclass
class TrainConfig:
    epochs: int = 300  # training epochs (a resume may raise it to extend a run)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # deterministic kernels: bitwise repeatable on the same hardware and kernels
    progress: str = "auto"  # auto | bar | log | none
    max_steps_per_epoch: int | None = None  # stop each epoch after N steps (quick runs and tests)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; losses in float32; fp16 uses a GradScaler)
    channels_last: bool = True  # measured 1.25x on CPU (fp32) and part of the 1.75-2.15x with bf16; see benchmarks
    compile: bool = False  # torch.compile the whole training step into one graph
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    tf32: bool = True  # CUDA: TF32 matrix multiplies and convolutions
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest kernels (not with train.deterministic)
    sync_bn: bool = False  # distributed: SyncBatchNorm (CUDA only)
    find_unused_parameters: bool = False  # distributed: for ablations that leave modules unused
    allow_world_size_change: bool = False  # distributed: permit resuming with another process count
    tensorboard: bool = False  # also log every metric to <run>/tensorboard (the tensorboard extra)
    #: evaluate on the test split every N epochs, and always at the last epoch; best.pt is chosen among those
    eval_every: int = 1
    #: off a terminal (output to a file): a step line every N steps (0: off) or every N seconds (0: off)
    log_every_steps: int = 0
    log_every_seconds: float = 60.0
    mlflow: bool = False  # also log to MLflow (the mlflow extra)
    mlflow_uri: str | None = None  # e.g. file:/path/mlruns; null: MLFLOW_TRACKING_URI, else <output_dir>/mlruns
    wandb: bool = False  # also log to Weights & Biases (the wandb extra; WANDB_MODE=offline works offline)
    tracker_project: str = "okd"  # the MLflow experiment and the W&B project
    track_every_steps: int = 0  # trackers: also log the step's loss and learning rates every N steps (0: off)


@dataclass
class RunConfig:
    name: str | None = None  # the run folder's name (None: <dataset>_<method>_<model>_s<seed>)
    output_dir: str = "runs"  # the folder run folders are made in
    seed: int = 0  # seeds weights, data order and augmentation
    #: the packaged recipe the data, optim and train settings come from (docs/recipes.md); None: no recipe, the
    #: settings are the config file's and the overrides' own ("custom")
    recipe: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Config:
    """A resolved configuration: the run settings plus the method's name and typed parameters."""

    run: RunConfig
    method_name: str
    method_params: Any

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self.run)
        if out["model"]["members"] is None:
            del out["model"]["members"]  # a cohort of copies reads (and is stored) as before members existed
        if out["data"]["sampler"] == "random":  # likewise the default sampler: stored as before it was a choice
            del out["data"]["sampler"], out["data"]["m_per_class"]
        out["method"] = {"name": self.method_name, **dataclasses.asdict(self.method_params)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_CHOICES = {
    ("data", "dataset"): ("cifar10", "cifar100", "imagenet", "tinyimagenet", "folder"),
    ("data", "train_crop"): ("random_resized", "pad_crop", "center"),
    ("data", "padding_mode"): ("reflect", "zeros"),
    ("data", "sampler"): ("random", "m_per_class"),
    ("train", "progress"): ("auto", "bar", "log", "none"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("optim", "schedule"): ("multistep", "ffsd_imagenet_code", "ffsd_imagenet_paper", "cosine"),
    ("optim", "lr_scaling"): ("none", "linear"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def typed_section(schema_cls, raw: dict, where: str):
    """``raw`` merged into ``schema_cls``; ``where`` prefixes the dotted key in messages ("" or "method")."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), raw)
        return OmegaConf.to_object(merged)
    except TypeError:  # OmegaConf cannot merge a mapping into a list (or the reverse)
        key, given = _container_mismatch(schema_cls, raw)
        raise shape_error(".".join(p for p in (where, key) if p), given) from None
    except OmegaConfBaseException as exc:
        key = str(
            getattr(exc, "full_key", None) or getattr(exc, "key", None) or _container_mismatch(schema_cls, raw)[0]
        )
        dotted = ".".join(p for p in (where, key) if p) or "the config"
        msg = str(exc).splitlines()[0]
        if isinstance(exc, ConfigKeyError):
            section = _section_of(schema_cls, key)
            valid = ", ".join(_field_names(section))
            raise ConfigError(f"unknown config key {dotted} ({msg}). Valid keys here: {valid}.") from None
        raise ConfigError(f"bad value for {dotted}: {msg}.") from None


def _container_mismatch(cls, raw, prefix: str = "") -> tuple[str, str]:
    """The first key of ``raw`` whose shape clashes with ``cls``'s field, and what ``raw`` gives there: a
    "mapping" where a value or list belongs (``data.mean.x=1``), or a "list" where a section belongs
    (``data=[1,2]``); ("", "") when none does."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        section = dataclasses.is_dataclass(default)
        if isinstance(value, dict | DictConfig):
            if not section:
                return f"{prefix}{key}", "mapping"
            found = _container_mismatch(type(default), value, f"{prefix}{key}.")
            if found[0]:
                return found
        elif section and isinstance(value, list | ListConfig):
            return f"{prefix}{key}", "list"
    return "", ""


def _clash(a: DictConfig, b: DictConfig, prefix: str = "") -> tuple[str, str]:
    """The first key that is a mapping in raw config ``a`` and a list in the later ``b`` (or the reverse), and what
    ``b`` gives there; ("", "") when none is."""
    for key in a.keys() & b.keys():
        x, y = a._get_node(key), b._get_node(key)
        dotted = f"{prefix}{key}"
        if isinstance(x, DictConfig) and isinstance(y, DictConfig):
            found = _clash(x, y, f"{dotted}.")
            if found[0]:
                return found
        elif {type(x), type(y)} == {DictConfig, ListConfig}:
            return dotted, "mapping" if isinstance(y, DictConfig) else "list"
    return "", ""


def shape_error(key: str, given: str) -> ConfigError:
    """The error for a mapping given where a value or list belongs, or a list where a section belongs."""
    if not key:  # OmegaConf's merge failed where no key of the config clashes (not seen in practice)
        return ConfigError("bad value in the config: a mapping and a list meet at the same key")
    belongs = "a section of keys" if given == "list" else "a value or a list"
    return ConfigError(f"bad value for {key}: a {given} where {belongs} belongs; `okd config --explain {key}` shows it")


def merge_raw(*parts: DictConfig) -> DictConfig:
    """``OmegaConf.merge`` of raw configs (later ones win), refusing a key that is a mapping in one and a list in
    another with okd's error."""
    try:
        return OmegaConf.merge(*parts)
    except TypeError:
        clashes = (_clash(a, b) for i, a in enumerate(parts) for b in parts[i + 1 :])
        raise shape_error(*next((c for c in clashes if c[0]), ("", ""))) from None


def _section_of(cls, dotted: str):
    """The dataclass that holds the last component of ``dotted`` (for listing valid keys)."""
    parts = [p for p in dotted.split(".") if p][:-1]
    for p in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields:
            return cls
        default = fields[p].default_factory() if fields[p].default_factory is not dataclasses.MISSING else None
        if default is None or not dataclasses.is_dataclass(default):
            return cls
        cls = type(default)
    return cls


def check_finite(obj, where: str) -> None:
    """Every float of a config dataclass (and of its float lists) is finite: ``nan <= 0`` is False, so range
    checks alone let NaN through."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{where}{f.name}.")
            continue
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{where}{f.name}={value} is not a finite number")


def _validate_optim(o: OptimConfig) -> None:
    ranges = {
        "momentum": (o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        "weight_decay": (o.weight_decay, o.weight_decay >= 0, ">= 0"),
        "gamma": (o.gamma, o.gamma > 0, "positive"),
        "warmup_epochs": (o.warmup_epochs, o.warmup_epochs >= 0, ">= 0"),
        "reference_batch": (o.reference_batch, o.reference_batch > 0, "positive"),
    }
    for key, (value, ok, rule) in ranges.items():
        if not ok:
            raise ConfigError(f"optim.{key} must be {rule}, got {value}")
    if any(m < 1 for m in o.milestones):
        raise ConfigError(f"optim.milestones are epochs and must be positive, got {list(o.milestones)}")


def _validate_sampler(d: DataConfig) -> None:
    if d.sampler != "m_per_class":
        return
    if d.dataset not in ("cifar10", "cifar100"):
        raise ConfigError(
            f"data.sampler=m_per_class works with the CIFAR loaders only (data.dataset=cifar10 or cifar100), "
            f"not data.dataset={d.dataset}; use data.sampler=random"
        )
    if d.m_per_class < 1 or d.batch_size % d.m_per_class:
        raise ConfigError(
            f"data.m_per_class must be >= 1 and divide data.batch_size, got m_per_class={d.m_per_class}, "
            f"batch_size={d.batch_size}"
        )


def validate_run(run: RunConfig) -> None:
    check_finite(run, "")
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(run, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    positive = {
        "train.epochs": run.train.epochs,
        "data.batch_size": run.data.batch_size,
        "data.test_batch_size": run.data.test_batch_size,
        "optim.lr": run.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key in ("limit_train", "limit_test"):
        v = getattr(run.data, key)
        if v is not None and v <= 0:
            raise ConfigError(f"data.{key} must be positive or null, got {v}")
    if run.train.max_steps_per_epoch is not None and run.train.max_steps_per_epoch <= 0:
        raise ConfigError("train.max_steps_per_epoch must be positive or null")
    for key in ("eval_every", "log_every_steps", "log_every_seconds", "track_every_steps"):
        value = getattr(run.train, key)
        if value < (1 if key == "eval_every" else 0):
            least = "a positive number of epochs" if key == "eval_every" else ">= 0 (0: off)"
            raise ConfigError(f"train.{key} must be {least}, got {value}")
    if run.data.holdout < 0:
        raise ConfigError(f"data.holdout must be >= 0, got {run.data.holdout}")
    if run.data.workers is not None and run.data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0 (0: load in the main process), got {run.data.workers}")
    if run.data.pad < 0:
        raise ConfigError(f"data.pad must be >= 0, got {run.data.pad}")
    for key in ("mean", "std"):
        v = getattr(run.data, key)
        if v is not None and len(v) != 3:
            raise ConfigError(f"data.{key} needs 3 values (R, G, B), got {list(v)}")
    if run.data.std is not None and min(run.data.std) <= 0:
        raise ConfigError(f"data.std must be positive, got {list(run.data.std)}")
    _validate_sampler(run.data)
    _validate_optim(run.optim)
    if run.data.image_size <= 0 or (run.data.resize is not None and run.data.resize < run.data.image_size):
        raise ConfigError(
            f"data.image_size must be positive and data.resize (null or >= image_size) not smaller than it; got "
            f"image_size={run.data.image_size}, resize={run.data.resize}"
        )
    if run.train.device not in ("auto", "cpu") and not run.train.device.startswith("cuda"):
        raise ConfigError(f"train.device={run.train.device!r}: use auto, cpu, cuda or cuda:N")


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        bad = [item for item in overrides if not _parses(item)] or list(overrides)
        why = " ".join(str(exc).split())
        raise ConfigError(
            f"cannot parse the override {' '.join(map(repr, bad))}: {why}. Quote the value in the shell and close "
            "its brackets, e.g. 'optim.milestones=[150,225]'"
        ) from None


def _parses(item: str) -> bool:
    try:
        OmegaConf.from_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError):
        return False
    return True


def load_raw(path: str | Path | None) -> DictConfig:
    if path is None:
        return OmegaConf.create({})
    found = resolve_config(path)
    if found is None:
        close = close_configs(path)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(
            f"config file {str(path)!r} does not exist, and no packaged config has that name{hint}; "
            "`okd configs` lists the packaged ones (e.g. cifar100/ffsd_resnet32)"
        )
    path = found
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (data, model, ...)")
    return raw


# --------------------------------------------------------------------------------------------------- recipes
#: where and how a run executes, never what it computes: a recipe may not set them and a resume may change them
#: (the one list behind both; ``okd.runs.resume_policy.MAY_CHANGE`` adds the resume's own keys)
RUNTIME_KEYS = frozenset(
    {
        "data.root",
        "data.download",
        "data.workers",
        "data.pin_memory",
        "train.device",
        "train.progress",
        "train.deterministic",
        "train.compile",
        "train.compile_mode",
        "train.tf32",
        "train.cudnn_benchmark",
        "train.channels_last",
        "train.tensorboard",
        "train.eval_every",
        "train.log_every_steps",
        "train.log_every_seconds",
        "train.mlflow",
        "train.mlflow_uri",
        "train.wandb",
        "train.tracker_project",
        "train.track_every_steps",
        "train.find_unused_parameters",
        "train.allow_world_size_change",
    }
)
#: what a recipe may not set: the runtime keys, the data set (a recipe lives under its data set's folder) and
#: the policy for the user's unreadable files
EXECUTION_KEYS = RUNTIME_KEYS | {"data.dataset", "data.skip_unreadable"}
#: keys that never make two runs' recipes differ: the execution keys, the evaluation batch and the seed
NOT_COMPARED = EXECUTION_KEYS | {"data.test_batch_size", "seed"}
RECIPE_SECTIONS = ("data", "optim", "train")
CUSTOM = "custom"  # how a run without a recipe is named in messages and reports


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, list | tuple) else value
    return out


def recipe_body(dataset: str, name: str) -> dict:
    """The settings recipe ``name`` of ``dataset`` gives (its file without ``description``), checked: only the
    sections data, optim, train and the seed, no execution key, every key known."""
    body = dict(read_recipe(dataset, name))
    body.pop("description", None)
    where = f"recipe {dataset}/{name}"
    extra = sorted(set(body) - {*RECIPE_SECTIONS, "seed"})
    if extra or any(not isinstance(body.get(s, {}), dict) for s in RECIPE_SECTIONS):
        raise ConfigError(f"{where} may hold only the sections data, optim, train and a seed; it has {sorted(body)}")
    banned = sorted(k for k in flatten(body) if k in EXECUTION_KEYS)
    if banned:
        raise ConfigError(f"{where} sets {', '.join(banned)}: where a run executes is no part of a recipe")
    try:
        typed_section(RunConfig, body, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return body


def compose(file_raw: DictConfig, overrides: DictConfig) -> DictConfig:
    """The raw config of a run: typed defaults < recipe < the config file's own keys < overrides.

    The recipe is the one the overrides name, else the file's (``recipe=ffsd`` replaces a packaged config's
    recipe as a whole, since packaged configs hold no recipe settings of their own); it is looked up for the
    dataset the file and overrides give. A file's recipe carried by ``data.dataset=...`` to a data set that has no
    recipe of that name keeps the settings it has for the file's own data set, and the run is "custom". Without a
    recipe the file and overrides alone count ("custom")."""
    top = merge_raw(file_raw, overrides)
    name = top.get("recipe")
    if name is None:
        return top
    if not isinstance(name, str):
        raise ConfigError(f"recipe={name!r} must be a recipe name, e.g. recipe=ffsd (`okd recipes` lists them)")
    dataset = OmegaConf.select(top, "data.dataset", default=None) or DataConfig.dataset
    own = OmegaConf.select(file_raw, "data.dataset", default=None) or DataConfig.dataset
    if (
        OmegaConf.select(overrides, "recipe", default=None) is None
        and own != dataset
        and name not in recipe_names(dataset)
    ):
        # a config file's recipe carried to another data set by data.dataset=...: its settings as written for
        # the file's own data set, and the run names no recipe of its own data set ("custom")
        body = OmegaConf.create(recipe_body(own, name))
        return merge_raw(body, file_raw, overrides, OmegaConf.create({"recipe": None}))
    return merge_raw(OmegaConf.create(recipe_body(dataset, name)), file_raw, overrides)


def recipe_run(dataset: str, name: str) -> RunConfig:
    """The run settings recipe ``name`` gives on ``dataset`` by itself (typed defaults < recipe)."""
    body = recipe_body(dataset, name)
    data = {**(body.get("data") or {}), "dataset": dataset}
    return typed_section(RunConfig, {**body, "data": data, "recipe": name}, "")


def recipe_deviations(run: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (the recipe's value, the run's value)}`` for every recipe setting the run changed (its
    config file or overrides); empty for a run that follows its recipe, or names none."""
    if run.recipe is None:
        return {}
    mine = flatten({s: dataclasses.asdict(getattr(run, s)) for s in RECIPE_SECTIONS})
    theirs = recipe_run(run.data.dataset, run.recipe)
    base = flatten({s: dataclasses.asdict(getattr(theirs, s)) for s in RECIPE_SECTIONS})
    return {k: (base[k], v) for k, v in mine.items() if k not in NOT_COMPARED and base.get(k) != v}


def recipe_summary(run: RunConfig) -> str:
    """One line naming the run's recipe and every recipe setting the run changed (the start line, reports)."""
    if run.recipe is None:
        return f"recipe {CUSTOM}: the run names no recipe; its settings are its config file's and overrides' own"
    try:
        changed = recipe_deviations(run)
    except ConfigError:  # a run of a recipe this okd does not ship (made by another version)
        return f"recipe {run.recipe}: not shipped with this okd, so what the run changed in it is unknown"
    text = f"recipe {run.recipe} ({run.data.dataset}; docs/recipes.md)"
    if not changed:
        return f"{text}, as the recipe gives it"
    return f"{text}, changed by this run: {describe_changes(changed)}"


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    """``key=new (recipe: old), ...`` of :func:`recipe_deviations`."""
    return ", ".join(f"{k}={_text(new)} (recipe: {_text(old)})" for k, (old, new) in changed.items())


def _text(value: Any) -> str:
    return "null" if value is None else str(value)
