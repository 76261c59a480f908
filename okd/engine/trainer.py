"""The one training loop: any registered method, one device, full and exact resume."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from okd.config import Config, recipe_summary
from okd.configs import packaged_recipe
from okd.data import build_loaders
from okd.data.device_loader import split_holdout
from okd.engine.builder import build_optimization, resolve_device
from okd.engine.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    check_global_batch,
    init_distributed,
    rank_device,
    shutdown,
)
from okd.engine.epoch import heartbeat, interactive, steps_per_epoch, sync, train_epoch
from okd.engine.evaluate import evaluate, is_scored, last_scored
from okd.engine.heartbeat import StepReport
from okd.engine.last_batch import drop_single_image_batches
from okd.engine.run_log import epoch_line, run_eta, run_summary
from okd.engine.seeding import restore_rng_state, rng_state, seed_everything, set_deterministic
from okd.engine.step import StepRunner, autocast, configure_backends, prepare_method
from okd.engine.threads import warn_threads_once
from okd.engine.trackers import Trackers, check_trackers, open_trackers
from okd.errors import CheckpointError, ConfigError, NonFiniteError, StopRequested
from okd.io import load_state_checked
from okd.log import log, setup_logging
from okd.methods import METHODS
from okd.methods.build import build_method
from okd.models.members import cohort_label
from okd.models.spec import deploy_fields
from okd.runs import resume_policy
from okd.runs.metrics import best_in_history
from okd.runs.reader import Run, run_folder_of
from okd.runs.records import deploy_record, first_nonfinite, last_record, nonfinite_values
from okd.runs.store import RunStore

DIVERGED_HINT = (
    "Training diverged: lower optim.lr (or check optim.milestones/optim.gamma and the method's loss weights) "
    "and train again."
)


def run_stem(cfg: Config) -> str:
    """``<dataset>_<method>_<model>``, with ``_<recipe>`` when the run's recipe is not the one okd's own config of
    that method uses on the dataset (``cifar100_dml_resnet32_ffsd``), so a method under another recipe never
    lands in the folder of its own recipe's run."""
    r = cfg.run
    model = cohort_label(cfg.to_dict()["model"]).replace(":", "-")  # import paths, timm: no ':' in folder names
    stem = f"{r.data.dataset}_{cfg.method_name}_{model}"
    if r.recipe is not None and r.recipe != packaged_recipe(r.data.dataset, cfg.method_name, r.model.name):
        stem += f"_{r.recipe}"
    return stem


def default_run_name(cfg: Config) -> str:
    return cfg.run.name or f"{run_stem(cfg)}_s{cfg.run.seed}"


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / default_run_name(cfg)


def config_from_run(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The resolved config stored in a run folder (its ``last.pt``), with optional overrides."""
    return Run(run_dir).config(overrides)


def _identity(cfg_dict: dict) -> tuple:
    return (cfg_dict["method"]["name"], cohort_label(cfg_dict["model"]), cfg_dict["data"]["dataset"])


class _GracefulStop:
    """Turns SIGTERM into a KeyboardInterrupt (:class:`StopRequested`) so a stopped run says how to resume it."""

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    @staticmethod
    def _handler(signum, frame):
        raise StopRequested(signum)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Train ``cfg`` into ``run_dir`` (default ``output_dir/name``); with ``resume``, continue its last.pt.

    Under ``torchrun`` every process calls this; the cohort is wrapped in DistributedDataParallel and only
    rank 0 writes the run folder, holding its lock (okd/runs/store.py) from before anything is built.
    """
    setup_logging()
    r = cfg.run
    dist = init_distributed(r.train.device)
    run_dir = run_folder_of(run_dir) if run_dir is not None else run_dir_for(cfg)
    store = RunStore(run_dir, writer=dist.is_main)
    try:
        with store.lock(create=not resume):
            return _train(cfg, run_dir, resume, dist, store)
    except KeyboardInterrupt:
        log.info(_stop_message(store, run_dir, r.train.epochs))  # in start-up, training or the save alike
        raise
    except NonFiniteError as exc:
        raise NonFiniteError(
            f"{exc}; the run stops, and nothing of that epoch was saved. {store.intact()} {DIVERGED_HINT}"
        ) from None
    finally:
        shutdown(dist)


def _stop_message(store: RunStore, run_dir: Path, epochs: int) -> str:
    done = store.committed_epoch
    if done == 0:
        return (
            f"stopped before the first epoch was committed: {run_dir} holds nothing to resume; "
            "start the run again with the same okd train command"
        )
    if done >= epochs:
        return f"stopped after its last epoch ({done}) was committed: the run in {run_dir} is complete"
    return f"stopped after epoch {done} (committed in last.pt); continue with: okd train --resume {run_dir}"


def _check_start(cfg: Config, store: RunStore, resume: bool, dist: DistContext) -> dict | None:
    run_dir = store.dir
    if not resume:
        if (run_dir / "last.pt").exists():
            raise ConfigError(
                f"run folder {str(run_dir)!r} already holds a run; continue it with `okd train --resume {run_dir}` "
                "or choose another name (name=...)"
            )
        if store.writer:
            store.refuse_orphaned_results()
        _check_teacher_file(cfg)
        return None
    ckpt = Run(run_dir, mmap=False).last  # checked: an okd run checkpoint of this folder
    if _identity(ckpt["config"]) != _identity(cfg.to_dict()):
        saved, asked = "/".join(_identity(ckpt["config"])), "/".join(_identity(cfg.to_dict()))
        raise CheckpointError(
            f"cannot resume {str(run_dir)!r}: it was trained as method/model/dataset {saved}, "
            f"but the config asks for {asked}. Resume without a config, or start a new run."
            + _members_note(ckpt["config"], cfg.to_dict())
        )
    resume_policy.resume_changes(ckpt, cfg)  # refuses a recipe change the restored state cannot take
    saved_world = ckpt.get("world_size", 1)
    if saved_world != dist.world_size and not cfg.run.train.allow_world_size_change:
        raise CheckpointError(
            f"{run_dir} was trained with {saved_world} process(es) and is resumed with {dist.world_size}; "
            "the per-rank random streams would differ. Resume with the same process count, or pass "
            "train.allow_world_size_change=true to accept a run that is no longer bitwise reproducible."
        )
    return ckpt


def _members_note(saved: dict, asked: dict) -> str:
    """What a resume that changes the cohort changes, by key (the cohort's networks are not the restored ones)."""
    old, new = saved["model"].get("members"), asked["model"].get("members")
    if old == new:
        return ""
    return (
        f" The cohort changed: model.members={old if old is not None else 'unset'} in the run, "
        f"{new if new is not None else 'unset'} asked; the restored weights are the run's own networks'."
    )


def _check_teacher_file(cfg: Config) -> None:
    """A teacher given as a run's deploy.pt (KD's ``method.teacher_checkpoint``) is read as its run commits it:
    a deploy.pt that a stop left out of line with the teacher run's last.pt is refused with the reason."""
    given = getattr(cfg.method_params, "teacher_checkpoint", None)
    if not given:
        return
    path = Path(given).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"method.teacher_checkpoint={given} is a folder; give the teacher run's deploy.pt ({path / 'deploy.pt'})"
        )
    if path.name != "deploy.pt" or not (path.parent / "last.pt").exists():
        return  # a file of its own (an export, a state_dict): read as it is
    _, source = Run(path.parent).deploy_record()
    if source != str(path):
        raise CheckpointError(
            f"method.teacher_checkpoint={given} does not hold the epoch its run commits in last.pt (the teacher run "
            f"was stopped in mid-save); resume the teacher run once (`okd train --resume {path.parent}`) to put it "
            "back in line, or export its network (`okd export RUN --format safetensors`) and give that file"
        )


def _train(cfg: Config, run_dir: Path, resume: bool, dist: DistContext, store: RunStore) -> Path:
    r = cfg.run
    started = time.perf_counter()
    ckpt = _check_start(cfg, store, resume, dist)
    store.committed_epoch = int(ckpt["epoch"]) if ckpt is not None else 0  # what a stop in start-up leaves
    check_trackers(r.train)  # a tracker's missing package: refused before anything is built (on every rank alike)
    set_deterministic(r.train.deterministic)
    seed_everything(r.seed)  # identical initial weights on every rank
    device = rank_device(dist, resolve_device(r.train.device))
    check_global_batch(r.data.batch_size, dist)
    views, view_augs = _method_views(cfg)
    train_loader, test_loader, num_classes, classes = build_loaders(r.data, r.seed, device, views, view_augs)
    rebuild = deploy_fields(cfg, train_loader, classes)
    holdout_loader = None
    if r.data.holdout:
        train_loader, holdout_loader = split_holdout(train_loader, r.data.holdout)
    for loader in (train_loader, test_loader, holdout_loader):
        if loader is None:
            continue
        loader.channels_last = r.train.channels_last
        if dist.enabled:
            loader.shard(dist.rank, dist.world_size)
    configure_backends(r.train, device)
    method = build_method(cfg, num_classes).to(device)
    drop_single_image_batches(method, train_loader, announce=dist.is_main)
    plan = build_optimization(method, cfg, steps_per_epoch=steps_per_epoch(train_loader, r.train))
    runner = StepRunner(method, plan.optimizers, r.train, device, schedulers=plan.step_schedulers)

    start_epoch, history, best = 0, [], {"top1": -1.0, "epoch": 0}
    if ckpt is not None:
        load_state_checked(method, ckpt["method"], f"{run_dir / 'last.pt'}")
        resume_policy.restore_optimization(plan, ckpt)
        runner.load_state_dict(ckpt.get("runner", {}))
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        restore_rng_state(rank_rng_state(ckpt["rng_per_rank"], dist.rank))
        log.info(f"resuming {run_dir} after epoch {start_epoch}")
    elif dist.enabled:
        torch.manual_seed(r.seed + 1000003 * dist.rank)  # per-rank streams (dropout etc.)
    prepare_method(method, r.train)
    if dist.enabled:
        runner.wrap_distributed(dist, r.train)
    store.begin(cfg, ckpt, lambda: deploy_record(cfg, method, start_epoch, rebuild))  # repairs what a stop left
    if dist.is_main:
        if ckpt is not None:
            resume_policy.record_resume(run_dir, ckpt["epoch"], resume_policy.resume_changes(ckpt, cfg))
        _log_start(cfg, run_dir, dist, plan, device, method.head_networks())
    if start_epoch >= r.train.epochs:
        log.info(f"{run_dir}: all {r.train.epochs} epochs already trained")
        if dist.is_main and history:
            _log_summary(run_dir, history, best.get("head"), time.perf_counter() - started)
        return run_dir

    deploy_head = method.deploy_head
    bars = interactive(r.train.progress) and dist.is_main
    paces: list[float] = []  # seconds per epoch (training + evaluation) in this process
    trackers = open_trackers(cfg, store) if dist.is_main else Trackers([])
    report = StepReport(r.train, heartbeat(r.train.progress), trackers, plan.learning_rates) if dist.is_main else None
    with _GracefulStop(), trackers:
        for epoch in range(start_epoch, r.train.epochs):
            if holdout_loader is not None:
                fit_on_holdout(method, holdout_loader, r.train, device)
            row = train_epoch(runner, train_loader, epoch, r.train, dist, paces, report)
            plan.end_of_epoch()
            metrics: dict[str, float] = {}
            if is_scored(epoch + 1, r.train):  # every train.eval_every epochs and the last
                eval_start = time.perf_counter()
                with autocast(r.train, device):
                    metrics = evaluate(method, test_loader, dist=dist, progress=bars)
                sync(device)
                row["time/eval_s"] = time.perf_counter() - eval_start
                metrics.update(method.derived_metrics(metrics))
                deploy_head = deploy_head or next(iter(metrics)).split("/")[0]
                row.update({f"test/{k}": v for k, v in metrics.items()})
            paces.append(row["time/epoch_s"] + row.get("time/eval_s", 0.0))
            method.after_evaluation(epoch)  # every epoch, scored or not (OKDPH's epoch-level fusion)
            row.update(plan.learning_rates())
            _check_finite(method, row, epoch + 1)
            history.append(row)
            score = metrics.get(f"{deploy_head}/top1", -1.0)
            improved = bool(metrics) and score > best["top1"]  # best.pt: chosen among the scored epochs only
            if improved:
                best = {"top1": score, "epoch": epoch + 1, "head": deploy_head}
            rngs = all_gather_objects(rng_state(), dist)
            if dist.is_main:
                last = last_record(cfg, runner, plan, epoch + 1, history, best, rngs)
                store.commit(last, improved, deploy_record(cfg, method, epoch + 1, rebuild))
                eta = run_eta(paces, r.train.epochs - epoch - 1)
                _report_epoch(row, r.train.progress, r.train.epochs, deploy_head, eta, method.head_networks())
                trackers.log_epoch(row, epoch + 1)
            else:
                store.committed_epoch = epoch + 1
            barrier(dist)
    if dist.is_main:
        _log_summary(run_dir, history, deploy_head, time.perf_counter() - started)
    return run_dir


def _log_summary(run_dir: Path, history: list[dict], head: str | None, wall_s: float) -> None:
    """The closing summary: deployed head, its final and best (test-selected) top-1, deploy.pt, wall time
    (final: the last scored epoch, which is the last epoch but in a run stopped between train.eval_every epochs)."""
    last = last_scored(history)
    if last is None:
        log.info(f"{run_dir}: no epoch was scored on the test split yet (train.eval_every)")
        return
    head = head or next(k.split("/")[1] for k in last if k.startswith("test/") and k.endswith("/top1"))
    deploy = run_dir / "deploy.pt"
    summary = run_summary(
        head,
        last[f"test/{head}/top1"],
        int(last["epoch"]),
        best_in_history(history, head),
        deploy if deploy.is_file() else None,
        wall_s,
    )
    for line in summary.splitlines():
        log.info(line)


def rank_rng_state(rngs: list[dict], rank: int) -> dict:
    """The saved generator states a resuming process restores: its own rank's, or rank 0's when the run was
    saved by fewer processes than now resume it."""
    return rngs[rank] if rank < len(rngs) else rngs[0]


def fit_on_holdout(method, loader, train_cfg, device: torch.device) -> None:
    """The method's pass over the held-out split before an epoch (KDCL's general weights), under the run's
    autocast and without autograd: no graph of it outlives the pass."""
    with torch.no_grad(), autocast(train_cfg, device):
        method.fit_on_holdout(loader)


def _check_finite(method, row: dict[str, float], epoch: int) -> None:
    """Nothing non-finite is committed: the weights and buffers, and the epoch's metrics (one host sync)."""
    bad = first_nonfinite(method.state_dict()) or next(iter(nonfinite_values(row)), None)
    if bad is not None:
        raise NonFiniteError(f"epoch {epoch}: {bad} is not finite (NaN or inf) after training")


def _log_start(
    cfg: Config, run_dir: Path, dist: DistContext, plan, device: torch.device, heads: dict | None = None
) -> None:
    r = cfg.run
    per_rank = r.data.batch_size // dist.world_size
    model = ", ".join(f"{h}={n}" for h, n in heads.items()) if heads else cohort_label(cfg.to_dict()["model"])
    log.info(
        f"{run_dir}: {cfg.method_name} / {model} / {r.data.dataset} on {device}"
        f" x{dist.world_size}; global batch {r.data.batch_size} ({per_rank} per process); "
        f"lr scaling {r.optim.lr_scaling} (x{plan.lr_factor:g}); {r.train.precision}; "
        f"{r.train.epochs} epochs; torch threads {torch.get_num_threads()}"
    )
    log.info(f"{run_dir}: {recipe_summary(r)}")
    if device.type == "cpu":
        warn_threads_once()


def _method_views(cfg: Config) -> tuple[int, list[str] | None]:
    """The method's views per training image and their named augmentations (None: the standard crop)."""
    cls = METHODS.get(cfg.method_name)
    return cls.views_for(cfg.method_params), cls.view_augmentations(cfg.method_params)


def _report_epoch(
    row: dict, progress: str, epochs: int, deployed: str | None, eta_s: float | None, labels: dict[str, str]
) -> None:
    if progress == "none":
        return
    heads = sorted({k.split("/")[1] for k in row if k.startswith("test/") and k.endswith("/top1")})
    line = epoch_line(row, heads, epochs, deployed, eta_s, labels)
    if interactive(progress):
        tqdm.write(line, file=sys.stderr)
    else:
        log.info(line)
