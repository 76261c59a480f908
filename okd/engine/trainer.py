"""The one training loop: any registered method, one device, full and exact resume."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from okd.config import Config, build_config
from okd.data import build_loaders
from okd.engine.builder import build_method, build_optimization, resolve_device
from okd.engine.checkpoint import atomic_save, atomic_write_text, load_checkpoint, load_state_checked
from okd.engine.evaluate import evaluate
from okd.engine.run_log import epoch_line, log, setup_logging, write_metrics_csv
from okd.engine.seeding import restore_rng_state, rng_state, seed_everything, set_deterministic
from okd.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "okd-run-v1"
BEST_NOTE = (
    "best.pt holds the epoch with the highest test top-1 of the deployable head: it is selected on the "
    "test split (as the reference papers report), so its accuracy is optimistic; last.pt is the honest number"
)


def default_run_name(cfg: Config) -> str:
    r = cfg.run
    return r.name or f"{r.data.dataset}_{cfg.method_name}_{r.model.name}_s{r.seed}"


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / default_run_name(cfg)


def config_from_run(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The resolved config stored in a run folder (its ``last.pt``), with optional overrides."""
    from omegaconf import OmegaConf

    from okd.config import parse_overrides

    ckpt = _load_run_checkpoint(Path(run_dir))
    raw = OmegaConf.merge(OmegaConf.create(ckpt["config"]), parse_overrides(list(overrides)))
    return build_config(raw)


def _load_run_checkpoint(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist; nothing to resume")
    ckpt = load_checkpoint(run_dir / "last.pt")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{run_dir / 'last.pt'} is not an okd run checkpoint (format {ckpt.get('format')!r})")
    return ckpt


def _identity(cfg_dict: dict) -> tuple:
    return (cfg_dict["method"]["name"], cfg_dict["model"]["name"], cfg_dict["data"]["dataset"])


class _GracefulStop:
    """Turns SIGTERM into KeyboardInterrupt so a stopped run says how to resume it."""

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    @staticmethod
    def _handler(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Train ``cfg`` into ``run_dir`` (default ``output_dir/name``); with ``resume``, continue its last.pt."""
    setup_logging()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    ckpt = None
    if resume:
        ckpt = _load_run_checkpoint(run_dir)
        if _identity(ckpt["config"]) != _identity(cfg.to_dict()):
            saved = "/".join(_identity(ckpt["config"]))
            asked = "/".join(_identity(cfg.to_dict()))
            raise CheckpointError(
                f"cannot resume {str(run_dir)!r}: it was trained as method/model/dataset {saved}, "
                f"but the config asks for {asked}. Resume without a config, or start a new run."
            )
    elif (run_dir / "last.pt").exists():
        raise ConfigError(
            f"run folder {str(run_dir)!r} already holds a run; continue it with `okd train --resume {run_dir}` "
            "or choose another name (name=...)"
        )

    r = cfg.run
    set_deterministic(r.train.deterministic)
    seed_everything(r.seed)
    device = resolve_device(r.train.device)
    method_cls_views = _method_views(cfg)
    train_loader, test_loader, num_classes, _ = build_loaders(r.data, r.seed, device, views=method_cls_views)
    method = build_method(cfg, num_classes).to(device)
    group_names, optimizers, schedulers = build_optimization(method, cfg)

    start_epoch, history, best = 0, [], {"top1": -1.0, "epoch": 0}
    if ckpt is not None:
        load_state_checked(method, ckpt["method"], f"{run_dir / 'last.pt'}")
        for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
        for sched, state in zip(schedulers, ckpt["schedulers"], strict=True):
            sched.load_state_dict(state)
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        restore_rng_state(ckpt["rng"])
        log.info(f"resuming {run_dir} after epoch {start_epoch}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.to_yaml(), run_dir / "config.yaml")
    if start_epoch >= r.train.epochs:
        log.info(f"{run_dir}: all {r.train.epochs} epochs already trained")
        return run_dir

    deploy_head = method.deploy_head
    with _GracefulStop():
        try:
            for epoch in range(start_epoch, r.train.epochs):
                row = _train_epoch(
                    method, train_loader, optimizers, epoch, r.train.max_steps_per_epoch, r.train.progress
                )
                for sched in schedulers:
                    sched.step()
                metrics = evaluate(method, test_loader)
                deploy_head = deploy_head or next(iter(metrics)).split("/")[0]
                row.update({f"test/{k}": v for k, v in metrics.items()})
                for name, opt in zip(group_names, optimizers, strict=True):
                    row[f"lr/{name}"] = opt.param_groups[0]["lr"]
                history.append(row)
                score = metrics.get(f"{deploy_head}/top1", -1.0)
                improved = score > best["top1"]
                if improved:
                    best = {"top1": score, "epoch": epoch + 1, "head": deploy_head}
                write_metrics_csv(history, run_dir / "metrics.csv")
                _save_run(run_dir, cfg, method, optimizers, schedulers, epoch + 1, history, best, improved)
                _report_epoch(row, method, r.train.progress)
        except KeyboardInterrupt:
            done = history[-1]["epoch"] if history else start_epoch
            log.info(f"stopped after epoch {int(done)}; continue with: okd train --resume {run_dir}")
            raise
    return run_dir


def _method_views(cfg: Config) -> int:
    from okd.methods import METHODS

    return METHODS.get(cfg.method_name).views


def _interactive(progress: str) -> bool:
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


def _train_epoch(method, loader, optimizers, epoch: int, max_steps: int | None, progress: str) -> dict[str, float]:
    method.train()
    loader.set_epoch(epoch)
    sums: dict[str, Tensor] = {}
    images_seen = 0
    batches = loader
    if _interactive(progress):
        from tqdm import tqdm

        total = len(loader) if max_steps is None else min(len(loader), max_steps)
        batches = tqdm(loader, total=total, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        losses = method.training_step(images, labels, epoch)
        total = sum(v for k, v in losses.items() if not k.startswith("stat/"))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in optimizers:
            opt.step()
        method.after_optimizer_step()
        n = labels.shape[0]
        images_seen += n
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.detach() * n
        sums["loss"] = sums.get("loss", 0.0) + total.detach() * n
    if images_seen == 0:
        raise ConfigError("the training split yielded no batch; lower data.batch_size or set data.drop_last=false")
    _sync(labels.device)
    seconds = time.perf_counter() - start
    row: dict[str, float] = {"epoch": epoch + 1}
    row.update({f"train/{k}": float(v) / images_seen for k, v in sums.items()})
    row["time/epoch_s"] = seconds
    row["time/images_per_s"] = images_seen / max(seconds, 1e-9)
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_run(run_dir, cfg, method, optimizers, schedulers, epoch, history, best, improved) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "method": method.state_dict(),
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "rng": rng_state(),
        "history": history,
        "best": best,
    }
    atomic_save(state, run_dir / "last.pt")
    if improved:
        atomic_save(
            {"format": CHECKPOINT_FORMAT + "-best", "note": BEST_NOTE, "selected_on": "test", **state},
            run_dir / "best.pt",
        )
    deploy = method.deployable()
    atomic_save(
        {
            "format": "okd-deploy-v1",
            "model": cfg.run.model.name,
            "method": cfg.method_name,
            "num_classes": int(method.ctx.num_classes),
            "epoch": epoch,
            "state_dict": {k: v.detach().cpu() for k, v in deploy.state_dict().items()},
        },
        run_dir / "deploy.pt",
    )


def _report_epoch(row: dict, method, progress: str) -> None:
    if progress == "none":
        return
    heads = sorted({k.split("/")[1] for k in row if k.startswith("test/") and k.endswith("/top1")})
    line = epoch_line(row, heads)
    if _interactive(progress):
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        log.info(line)
