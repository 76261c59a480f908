"""``okd report``: mean ± std over seeds of every head, final and best epoch, next to the published figures.

Runs are grouped by dataset, backbone, method, method parameters and planned epochs (so runs that differ
only in their seed are pooled). For each head: the final-epoch accuracy (the headline) and the best-epoch
accuracy, i.e. each run's maximum over epochs, *selected on the test split* as the reference papers do.
The std is the population std (ddof=0), as the FFSD paper's Table I. Δ = ours − published.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from okd.engine.run_log import head_label
from okd.errors import CheckpointError
from okd.methods.build import method_defaults
from okd.models.members import cohort_label
from okd.report.comparability import caveats
from okd.report.published import PublishedRow, find_published
from okd.runs.reader import Run, expand_run_dirs

METRICS = ("top1", "top5")
#: head families averaged per epoch into ``avg(<prefix>*)`` (FFSD Table IV's "2-net average")
AVERAGED_PREFIXES = ("student", "net", "branch", "peer")
#: config keys that do not change what is measured (ignored when checking that pooled runs agree)
IGNORED_KEYS = re.compile(
    r"^(name|output_dir|seed|data\.(root|download|test_batch_size|workers|pin_memory|skip_unreadable)|"
    r"train\.(device|progress|compile|compile_mode|cudnn_benchmark|tf32|deterministic|channels_last)|"
    r"train\.epochs|method\..*)$"
)
PREAMBLE = (
    "Test accuracy (%), mean ± std over runs (population std, ddof=0, as in the FFSD paper). "
    "**final**: the last epoch (the headline number). **best (selected on test)**: each run's maximum over "
    "epochs, chosen on the test split as the reference papers report; optimistic. **published**: the "
    "reference figure for the same method, backbone and dataset (best test epoch; `okd/report/published.csv`); "
    "Δ = ours − published."
)


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
    #: a cohort of different networks: each per-network head's network (last.pt's ``head_networks``)
    networks: dict[str, str] = field(default_factory=dict)


@dataclass
class HeadRow:
    """One line of the report: a head of a group of runs."""

    dataset: str
    model: str
    method: str
    variant: str
    epochs: str
    head: str
    deployed: bool
    n: int
    seeds: list
    stats: dict[str, tuple[float, float]]  # "final/top1" etc. -> (mean, std)
    published: PublishedRow | None = None
    others: list[PublishedRow] = field(default_factory=list)
    network: str | None = None  # the head's network, in a cohort of different networks

    def diff(self, which: str) -> float | None:
        mean = self.stats.get(f"{which}/top1")
        if self.published is None or mean is None:
            return None
        return mean[0] - self.published.value_float


@dataclass
class Group:
    dataset: str
    model: str
    method: str
    variant: str
    epochs: str
    runs: list[RunResult]
    rows: list[HeadRow]
    notes: list[str]
    #: why the runs are not comparable with the published figures shown (empty: they are, or none is shown)
    caveats: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- reading
def _avg_families(heads: list[str]) -> dict[str, list[str]]:
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
    for name, members in _avg_families(heads).items():
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
        heads=heads + [h for h in _avg_families(heads)],
        final={k: v[-1] for k, v in series.items()},
        best={k: max(v) for k, v in series.items()},
        config=cfg,
        networks=dict(run.last.get("head_networks") or {}),
    )


# ---------------------------------------------------------------------------------------------- aggregating
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0); std 0 for one value."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _plain(v):
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def variant_of(method: str, params: dict) -> str:
    """``k=v`` of the method parameters that differ from the method's defaults (all of them if unknown)."""
    defaults = method_defaults(method)
    items = sorted(params.items())
    if defaults is not None:
        items = [(k, v) for k, v in items if k not in defaults or _plain(defaults[k]) != _plain(v)]
    return ", ".join(f"{k}={v}" for k, v in items)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _group_notes(runs: list[RunResult]) -> list[str]:
    notes = []
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f if not IGNORED_KEYS.match(k)})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    if differ:
        notes.append(f"the pooled runs' configs differ in: {', '.join(differ)}")
    partial = [r for r in runs if r.epochs is not None and r.epochs_done < r.epochs]
    if partial:
        done = ", ".join(f"{r.path.name} ({r.epochs_done}/{r.epochs})" for r in partial)
        notes.append(f"unfinished runs (epochs done/planned): {done}")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        notes.append(f"repeated seeds: {seeds}")
    return notes


def aggregate(runs: list[RunResult]) -> list[Group]:
    """Pool runs that differ only in their seed; one :class:`HeadRow` per head."""
    buckets: dict[tuple, list[RunResult]] = {}
    for r in runs:
        key = (r.dataset, r.model, r.method, json.dumps(r.params, sort_keys=True, default=str), r.epochs)
        buckets.setdefault(key, []).append(r)
    groups = []
    for (dataset, model, method, _, epochs), members in buckets.items():
        variant = variant_of(method, members[0].params)
        defaults = method_defaults(method)
        heads: list[str] = []
        for r in members:
            heads += [h for h in r.heads if h not in heads]
        deploy = members[0].deploy_head
        rows = []
        for head in heads:
            stats = {}
            n = 0
            for which in ("final", "best"):
                for m in METRICS:
                    vals = [getattr(r, which)[f"{head}/{m}"] for r in members if f"{head}/{m}" in getattr(r, which)]
                    if vals:
                        stats[f"{which}/{m}"] = mean_std(vals)
                        n = max(n, len(vals))
            published = _published_for(dataset, model, method, members[0].params, defaults, head, deploy)
            rows.append(
                HeadRow(
                    dataset=dataset,
                    model=model,
                    method=method,
                    variant=variant,
                    epochs=str(epochs),
                    head=head,
                    deployed=head == deploy,
                    n=n,
                    seeds=[r.seed for r in members if f"{head}/top1" in r.final],
                    stats=stats,
                    published=published[0] if published else None,
                    others=published[1:],
                    network=members[0].networks.get(head),
                )
            )
        shown = [p for r in rows for p in ([r.published] if r.published else []) + r.others]
        notes = _group_notes(members)
        groups.append(
            Group(dataset, model, method, variant, str(epochs), members, rows, notes, caveats(members, shown))
        )
    return sorted(groups, key=lambda g: (g.dataset, g.model, g.method, g.variant, g.epochs))


def _published_for(dataset, model, method, params, defaults, head, deploy) -> list[PublishedRow]:
    rows = find_published(method, model, dataset, params, defaults)
    return [r for r in rows if r.head == head or (r.head == "@deploy" and head == deploy)]


def build_report(run_dirs: list[str | Path]) -> list[Group]:
    """Read and aggregate run folders (a folder of runs expands to its runs)."""
    return aggregate([read_run(p) for p in expand_run_dirs(run_dirs)])


# ------------------------------------------------------------------------------------------------ rendering
def _pm(stat: tuple[float, float] | None, n: int) -> str:
    if stat is None:
        return "—"
    return f"{stat[0]:.2f}" if n < 2 else f"{stat[0]:.2f} ± {stat[1]:.2f}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def _other_sources(row: HeadRow) -> list[str]:
    """The other published figures of a head, ``value (source)``, each once (a source printing the same value
    in several rows, e.g. CMFF's two baseline students, is named once) and not repeating the headline one."""
    seen = {f"{row.published.text()} ({row.published.where})"} if row.published else set()
    out = []
    for o in row.others:
        text = f"{o.text()} ({o.where})"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def to_markdown(groups: list[Group]) -> str:
    """The report as Markdown: one table per group of runs."""
    lines = ["# okd report", "", PREAMBLE, ""]
    for g in groups:
        title = f"{g.dataset} · {g.model} · {g.method}" + (f" ({g.variant})" if g.variant else "")
        seeds = ", ".join(str(r.seed) for r in g.runs)
        lines += [f"## {title}", "", f"{len(g.runs)} run(s), seeds {seeds}; {g.epochs} epochs.", ""]
        if g.caveats:
            lines += [f"**Not comparable with the published figures:** {'; '.join(g.caveats)}.", ""]
        lines.append(
            "| head | top-1 final | top-1 best (selected on test) | top-5 final | top-5 best (selected on test) "
            "| published top-1 | Δ final | Δ best | published in |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in g.rows:
            head = head_label(r.head, {r.head: r.network} if r.network else None, " ")
            name = f"**{head}** (deployed)" if r.deployed else head
            pub = r.published.text() if r.published else "—"
            where = f"{r.published.where} ({r.published.metric})" if r.published else ""
            if others := _other_sources(r):
                where += "; also " + "; ".join(others)
            lines.append(
                f"| {name} | {_pm(r.stats.get('final/top1'), r.n)} | {_pm(r.stats.get('best/top1'), r.n)} "
                f"| {_pm(r.stats.get('final/top5'), r.n)} | {_pm(r.stats.get('best/top5'), r.n)} "
                f"| {pub} | {_signed(r.diff('final'))} | {_signed(r.diff('best'))} | {where} |"
            )
        if not any(r.published for r in g.rows):
            lines += ["", f"No published figure for {g.method} / {g.model} / {g.dataset}."]
        for note in g.notes:
            lines += ["", f"Note: {note}."]
        lines.append("")
    return "\n".join(lines)


CSV_COLUMNS = (
    "dataset model method variant epochs head network deployed n_runs seeds "
    "final_top1_mean final_top1_std best_top1_mean best_top1_std "
    "final_top5_mean final_top5_std best_top5_mean best_top5_std "
    "published_top1 published_std published_source published_metric published_spec_row "
    "diff_final_top1 diff_best_top1 other_published notes not_comparable"
).split()


def _num(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))  # full precision


def to_csv(groups: list[Group]) -> str:
    """The report as CSV: one row per head of each group; std is ddof=0; ``best_*`` is selected on test."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        for r in g.rows:
            row = {
                "dataset": r.dataset,
                "model": r.model,
                "method": r.method,
                "variant": r.variant,
                "epochs": r.epochs,
                "head": r.head,
                "network": r.network or "",
                "deployed": int(r.deployed),
                "n_runs": r.n,
                "seeds": " ".join(map(str, r.seeds)),
                "diff_final_top1": _num(r.diff("final")),
                "diff_best_top1": _num(r.diff("best")),
                "other_published": "; ".join(f"{o.text()} ({o.where}, row {o.spec_row})" for o in r.others),
                "notes": "; ".join(g.notes),
                "not_comparable": "; ".join(g.caveats),
            }
            for which in ("final", "best"):
                for m in METRICS:
                    stat = r.stats.get(f"{which}/{m}")
                    row[f"{which}_{m}_mean"] = _num(stat[0] if stat else None)
                    row[f"{which}_{m}_std"] = _num(stat[1] if stat else None)
            if r.published:
                p = r.published
                row.update(
                    published_top1=p.value,
                    published_std=p.std,
                    published_source=p.where,
                    published_metric=p.metric,
                    published_spec_row=p.spec_row,
                )
            writer.writerow(row)
    return buf.getvalue()


def report(run_dirs: list[str | Path], markdown: str | Path | None = None, csv_path: str | Path | None = None) -> str:
    """Build the report, write the requested files and return the Markdown."""
    groups = build_report(run_dirs)
    text = to_markdown(groups)
    if markdown:
        Path(markdown).write_text(text, encoding="utf-8")
    if csv_path:
        Path(csv_path).write_text(to_csv(groups), encoding="utf-8")
    return text
