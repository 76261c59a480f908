"""Shared helpers of the report commands: run folders, optional extras, methods, networks and class names."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import yaml
from torch import nn

from okd.errors import CheckpointError, OKDError, UnsafeCheckpointError

CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OKDError(
            f'this command needs {module.split(".")[0]}, an optional extra: pip install "okd[{extra}]"'
        ) from None


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


# ------------------------------------------------------------------------------------------------ run folders
def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "metrics.csv").is_file()


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``; a folder that is not a run but holds runs expands to them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            out.append(p)
        elif p.is_dir() and (subs := sorted(s for s in p.iterdir() if is_run_dir(s))):
            out.extend(subs)
        else:
            raise CheckpointError(f"{str(p)!r} is not a run folder (no metrics.csv) nor a folder of runs")
    return out


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run saved in ``config.yaml`` (a plain dict)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} has no config.yaml; is it an okd run folder?")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return cfg


# ----------------------------------------------------------------------------------------------------- methods
def method_class(name: str):
    """The registered method class ``name``; imports okd.methods' modules if it is not registered yet.

    Returns None when no module defines it (the report then works from the run's files alone).
    """
    from okd.methods import METHODS

    if name in METHODS:
        return METHODS.get(name)
    import okd.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"okd.methods.{info.name}")
        except Exception:  # a module that does not import is not the one we need
            continue
        if name in METHODS:
            return METHODS.get(name)
    return None


def method_defaults(name: str) -> dict | None:
    """The default method parameters of ``name`` (its ``Params`` dataclass), or None if unknown."""
    cls = method_class(name)
    if cls is None:
        return None
    try:
        return dataclasses.asdict(cls.Params())
    except TypeError:  # a Params without defaults for every field
        return None


def load_run_method(path: str | Path, which: str = "last", overrides: list[str] = ()):
    """Rebuild a run's method from ``last.pt``/``best.pt`` (or a checkpoint file), in eval mode on the CPU.

    Returns ``(method, cfg, checkpoint_path)``.
    """
    from omegaconf import OmegaConf

    from okd.config import build_config, parse_overrides
    from okd.engine.builder import build_method
    from okd.engine.checkpoint import load_checkpoint, load_state_checked
    from okd.engine.scoring import resolve_checkpoint
    from okd.models.spec import check_stored_config

    ckpt_path = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    if "config" not in ckpt or "method" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a run checkpoint (no config/method state); use last.pt or best.pt")
    method_class(ckpt["config"].get("method", {}).get("name", "baseline"))
    check_stored_config(ckpt["config"])  # the run folder names code to import: only with the user's consent
    cfg = build_config(OmegaConf.merge(OmegaConf.create(ckpt["config"]), parse_overrides(list(overrides))))
    stored = ckpt.get("num_classes")  # written into run checkpoints; older ones: the dataset or deploy.pt says
    num_classes = stored if isinstance(stored, int) else num_classes_of(cfg.run.data.dataset, Path(ckpt_path).parent)
    method = build_method(cfg, num_classes)
    load_state_checked(method, ckpt["method"], str(ckpt_path))
    return method.eval(), cfg, ckpt_path


def deploy_head_of(run_dir: str | Path, cfg: dict | None = None, heads: list[str] = ()) -> str | None:
    """The head that scores the deployed network: from last.pt (``best['head']``), else the method class,
    else the first head (the trainer's rule)."""
    from okd.engine.checkpoint import load_checkpoint

    last = Path(run_dir) / "last.pt"
    if last.is_file():
        try:
            head = (load_checkpoint(last).get("best") or {}).get("head")
            if head:
                return head
        except UnsafeCheckpointError:
            raise  # a pickled object: refused, never ignored
        except CheckpointError:
            pass  # a truncated last.pt (a run being written): the method's rule decides
    name = ((cfg or {}).get("method") or {}).get("name")
    cls = method_class(name) if name else None
    if cls is not None and getattr(cls, "deploy_head", None):
        return cls.deploy_head
    return heads[0] if heads else None


# ---------------------------------------------------------------------------------------------------- networks
def _has_taps(module: nn.Module) -> bool:
    return callable(getattr(module, "forward_taps", None))


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") and len(name) > 1 else name


def tap_networks(method: nn.Module) -> dict[str, nn.Module]:
    """The networks of a method that expose ``forward_taps``, named like its heads.

    A method may define ``attention_networks() -> dict``; otherwise its children are searched: a network
    attribute keeps its name (``leader``, ``net``), a list of networks is numbered (``students`` ->
    ``student0``, ``student1``), a multi-branch network gives each branch (``branch0``, ...). Falls back to
    ``deployable()``.
    """
    custom = getattr(method, "attention_networks", None)
    if callable(custom):
        return dict(custom())
    found: dict[str, nn.Module] = {}

    def add(name: str, prefix: str, net: nn.Module) -> None:
        found[name if name not in found else f"{prefix.replace('.', '_')}{name}"] = net  # PCL: ema_branch0

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if _has_taps(child):
                add(name, prefix, child)
            elif callable(getattr(child, "single_branch", None)) and hasattr(child, "num_branches"):
                head = getattr(method, "head_prefix", "branch")
                for i in range(int(child.num_branches)):
                    add(f"{head}{i}", prefix, child.single_branch(i))
            elif isinstance(child, nn.ModuleList) and len(child) and all(_has_taps(c) for c in child):
                for i, c in enumerate(child):
                    add(f"{_singular(name)}{i}", prefix, c)
            else:
                visit(child, f"{prefix}{name}.")

    visit(method, "")
    if not found:
        found["deployed"] = method.deployable()
    return found


# ------------------------------------------------------------------------------------------- dataset facts
#: ImageNet-style folders (``okd.data.folder``): classes when the run folder cannot tell, input size and the
#: shorter side images are resized to before the centre crop (ImageNet's test recipe: 256 then 224)
FOLDER_DATASETS = {"imagenet": (1000, 224, 256), "tinyimagenet": (200, 64, 64)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def num_classes_of(dataset: str, run_dir: Path | None = None) -> int:
    """Classes of ``dataset``: CIFAR's spec, else the run's deploy.pt, else the folder dataset's standard count."""
    from okd.data.cifar import SPECS

    if dataset in SPECS:
        return SPECS[dataset].num_classes
    deploy = run_dir / "deploy.pt" if run_dir is not None else None
    if deploy is not None and deploy.is_file():
        from okd.engine.deploy_file import read_deploy

        return int(read_deploy(deploy)["num_classes"])
    if dataset in FOLDER_DATASETS:
        return FOLDER_DATASETS[dataset][0]
    raise CheckpointError(f"cannot tell how many classes dataset {dataset!r} has")


def input_geometry(dataset: str | None, data: dict | None = None) -> tuple[int, int | None]:
    """``(size, shorter side before the centre crop)``; CIFAR: (32, None), i.e. a plain resize to 32x32;
    ``folder``: from the run's ``data`` section (``data.image_size``, ``data.resize``)."""
    if dataset == "folder":
        from okd.config import DataConfig
        from okd.data.folder import geometry

        known = {k: v for k, v in (data or {}).items() if k in ("dataset", "image_size", "resize", "train_crop")}
        return geometry(DataConfig(**known))[:2]
    if dataset in FOLDER_DATASETS:
        return FOLDER_DATASETS[dataset][1], FOLDER_DATASETS[dataset][2]
    return 32, None


# ------------------------------------------------------------------------------------------------ class names
def default_class_names(num_classes: int) -> list[str]:
    from okd.data.cifar import CIFAR10_CLASSES

    if num_classes == 10:
        return list(CIFAR10_CLASSES)
    if num_classes == 100:
        return list(CIFAR100_CLASSES)
    return [str(i) for i in range(num_classes)]


def class_names(dataset: str | None, root: str | None, num_classes: int) -> list[str]:
    """Class names from the dataset's own files when they are at ``root``, else the CIFAR-10/100 defaults
    (folder datasets: class indices)."""
    if dataset and root and dataset not in FOLDER_DATASETS and dataset != "folder":
        from okd.data.cifar import load_cifar

        try:
            names = load_cifar(root, dataset, train=False, download=False).classes
            if len(names) == num_classes:
                return list(names)
        except OKDError:
            pass
    return default_class_names(num_classes)


def normalization(cfg_data: dict | None, dataset: str | None) -> tuple[list[float], list[float]]:
    """The run's input mean/std (its config, else the dataset's standard statistics, else CIFAR-100's)."""
    from okd.data.cifar import DATASET_STATS

    cfg_data = cfg_data or {}
    if dataset in FOLDER_DATASETS or dataset == "folder":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = DATASET_STATS.get(dataset or "", DATASET_STATS["cifar100"])
    return list(cfg_data.get("mean") or mean), list(cfg_data.get("std") or std)
