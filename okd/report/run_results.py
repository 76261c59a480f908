"""One run folder as the reports read it: identity, recipe, per-head final and best accuracies, timing.

Every report (``okd report``, ``okd compare``) reads runs through :func:`read_run`, which goes through
:class:`~okd.runs.reader.Run` (the epoch last.pt commits, or a refusal with the reason).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from okd.config import CUSTOM
from okd.errors import CheckpointError
from okd.models.members import cohort_label
from okd.runs.reader import Run
from okd.runs.records import scored_epochs

METRICS = ("top1", "top5")
#: head families averaged per epoch into ``avg(<prefix>*)`` (FFSD Table IV's "2-net average")
AVERAGED_PREFIXES = ("student", "net", "branch", "peer")


@dataclass
class RunResult:
    """One run folder's identity and per-head final/best accuracies."""

    path: Path
    dataset: str
    model: str
    method: str
    params: dict
    epochs: int | None  # planned (train.epochs)
    epochs_done: int
    seed: int | None
    deploy_head: str | None
    heads: list[str]
    final: dict[str, float]  # "<head>/<metric>" -> value at the last epoch
    best: dict[str, float]  # "<head>/<metric>" -> max over epochs
    config: dict = field(repr=False, default_factory=dict)
    recipe: str | None = None  # the recipe the run names (None: none, "custom")
    images_per_s: float | None = None  # training throughput, mean over the epochs (all processes together)
    seconds: float = 0.0  # training + evaluation time summed over the epochs
    world_size: int = 1  # processes (one per device) that trained the run
    device: str | None = None  # what the timings were measured on (last.pt's record; None for older runs)
    #: a cohort of different networks: each per-network head's network (last.pt's ``head_networks``)
    networks: dict[str, str] = field(default_factory=dict)
    #: the epochs evaluated on the test split (all, or every train.eval_every-th and the last); ``final`` is the
    #: last of them, ``best`` the best among them
    scored_epochs: list[int] = field(default_factory=list)

    def scoring_note(self) -> str | None:
        """Which epochs were scored, when not every epoch was (None when every one was)."""
        if len(self.scored_epochs) == self.epochs_done:
            return None
        shown = self.scored_epochs
        epochs = ", ".join(map(str, shown)) if len(shown) <= 6 else f"{shown[0]}, {shown[1]}, ..., {shown[-1]}"
        final = f"; final is epoch {shown[-1]}'s" if shown and shown[-1] != self.epochs_done else ""
        where = f"{self.path.name} scored only at epochs {epochs or 'none'} of {self.epochs_done}"
        return f"{where} (train.eval_every){final}"

    @property
    def recipe_name(self) -> str:
        return self.recipe or CUSTOM


def avg_families(heads: list[str]) -> dict[str, list[str]]:
    """``avg(<prefix>*)`` -> its member heads, for every family of at least two numbered heads."""
    fams = {}
    for prefix in AVERAGED_PREFIXES:
        members = [h for h in heads if re.fullmatch(rf"{prefix}\d+", h)]
        if len(members) >= 2:
            fams[f"avg({prefix}*)"] = members
    return fams


def _series(rows: list[dict[str, float]], heads: list[str]) -> dict[str, list[float]]:
    """Per-epoch values of every ``<head>/<metric>``, derived averages included."""
    out: dict[str, list[float]] = {}
    for head in heads:
        for m in METRICS:
            values = [r[f"test/{head}/{m}"] for r in rows if f"test/{head}/{m}" in r]
            if values:
                out[f"{head}/{m}"] = values
    for name, members in avg_families(heads).items():
        keys = [f"test/{h}/top1" for h in members]
        values = [statistics.fmean(r[k] for k in keys) for r in rows if all(k in r for k in keys)]
        if values:
            out[f"{name}/top1"] = values
    return out


def _heads_of(columns: Iterable[str]) -> list[str]:
    heads = []
    for c in columns:
        if c.startswith("test/") and c.endswith("/top1"):
            heads.append(c[len("test/") : -len("/top1")])
    return heads


def read_run(run_dir: str | Path) -> RunResult:
    """A run folder's config and history as its last.pt commits them (:class:`~okd.runs.reader.Run`)."""
    run = Run(run_dir)
    run_dir = run.dir
    cfg = run.config_dict
    rows = run.history
    if not rows:
        raise CheckpointError(f"{run_dir} has no epoch yet")
    heads = _heads_of(list(dict.fromkeys(k for row in rows for k in row)))
    series = _series(rows, heads)
    method_cfg = dict(cfg.get("method") or {})
    method = method_cfg.pop("name", "baseline")
    speeds = [r["time/images_per_s"] for r in rows if "time/images_per_s" in r]
    return RunResult(
        path=run_dir,
        dataset=(cfg.get("data") or {}).get("dataset", "?"),
        model=cohort_label(cfg.get("model") or {}),
        method=method,
        params=method_cfg,
        epochs=(cfg.get("train") or {}).get("epochs"),
        epochs_done=int(rows[-1].get("epoch", len(rows))),
        seed=cfg.get("seed"),
        deploy_head=run.deploy_head or (heads[0] if heads else None),
        heads=heads + [h for h in avg_families(heads)],
        final={k: v[-1] for k, v in series.items()},
        best={k: max(v) for k, v in series.items()},
        config=cfg,
        networks=dict(run.last.get("head_networks") or {}),
        recipe=cfg.get("recipe"),
        images_per_s=statistics.fmean(speeds) if speeds else None,
        seconds=sum(r.get("time/epoch_s", 0.0) + r.get("time/eval_s", 0.0) for r in rows),
        world_size=int(run.last.get("world_size") or 1),
        device=run.last.get("device"),
        scored_epochs=scored_epochs(rows),
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0); std 0 for one value."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0
