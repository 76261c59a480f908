"""``okd report``: mean ± std over seeds of every head, final and best epoch, next to the published figures.

Runs are grouped by dataset, backbone, method, method parameters, recipe and planned epochs (so runs that
differ only in their seed are pooled); each group names its recipe, and a report over runs of several recipes
says so at the top (``okd compare`` sets methods side by side under one recipe: :mod:`okd.report.compare`).
For each head: the final-epoch accuracy (the headline) and the best-epoch accuracy, i.e. each run's maximum
over epochs, *selected on the test split* as the reference papers do. The std is the population std (ddof=0),
as the FFSD paper's Table I. Δ = ours − published.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from okd.config import CUSTOM, flatten
from okd.engine.run_log import head_label
from okd.methods.build import method_defaults
from okd.report.comparability import caveats
from okd.report.published import PublishedRow, find_published
from okd.report.run_results import METRICS, RunResult, mean_std, read_run
from okd.runs.reader import expand_run_dirs

__all__ = ["Group", "HeadRow", "aggregate", "build_report", "read_run", "report", "to_csv", "to_markdown"]

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
    "reference figure for the same method, backbone and dataset (best test epoch; `okd/report/published.csv`) "
    "trained under the runs' recipe, or whose recipe its source leaves unstated (marked); Δ = ours − published."
)


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
    recipe: str | None = None  # the recipe the pooled runs name (None: none, "custom")


# ---------------------------------------------------------------------------------------------- aggregating
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


def _group_notes(runs: list[RunResult]) -> list[str]:
    notes = []
    flat = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f if not IGNORED_KEYS.match(k)})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    if differ:
        notes.append(f"the pooled runs' configs differ in: {', '.join(differ)}")
    partial = [r for r in runs if r.epochs is not None and r.epochs_done < r.epochs]
    if partial:
        done = ", ".join(f"{r.path.name} ({r.epochs_done}/{r.epochs})" for r in partial)
        notes.append(f"unfinished runs (epochs done/planned): {done}")
    notes += [note for r in runs if (note := r.scoring_note())]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) < len(seeds):
        notes.append(f"repeated seeds: {seeds}")
    return notes


def aggregate(runs: list[RunResult]) -> list[Group]:
    """Pool runs that differ only in their seed; one :class:`HeadRow` per head."""
    buckets: dict[tuple, list[RunResult]] = {}
    for r in runs:
        params = json.dumps(r.params, sort_keys=True, default=str)
        buckets.setdefault((r.dataset, r.model, r.method, params, r.recipe, r.epochs), []).append(r)
    groups = []
    for (dataset, model, method, _, recipe, epochs), members in buckets.items():
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
            published = _published_for(dataset, model, method, members[0].params, defaults, head, deploy, recipe)
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
            Group(dataset, model, method, variant, str(epochs), members, rows, notes, caveats(members, shown), recipe)
        )
    return sorted(groups, key=lambda g: (g.dataset, g.recipe or "", g.model, g.method, g.variant, g.epochs))


def _published_for(dataset, model, method, params, defaults, head, deploy, recipe) -> list[PublishedRow]:
    rows = find_published(method, model, dataset, params, defaults, recipe=recipe)
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


def _where(row: PublishedRow, recipe: str | None) -> str:
    """``source, table``, marked where the source leaves its recipe unstated and the runs name one."""
    return row.where + (" [recipe unstated]" if recipe is not None and not row.recipes else "")


def _other_sources(row: HeadRow, recipe: str | None = None) -> list[str]:
    """The other published figures of a head, ``value (source)``, each once (a source printing the same value
    in several rows, e.g. CMFF's two baseline students, is named once) and not repeating the headline one."""
    seen = {f"{row.published.text()} ({_where(row.published, recipe)})"} if row.published else set()
    out = []
    for o in row.others:
        text = f"{o.text()} ({_where(o, recipe)})"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def to_markdown(groups: list[Group]) -> str:
    """The report as Markdown: one table per group of runs."""
    lines = ["# okd report", "", PREAMBLE, "", recipes_line(groups), ""]
    for g in groups:
        recipe = g.recipe or CUSTOM
        title = f"{g.dataset} · {g.model} · {g.method}" + (f" ({g.variant})" if g.variant else "") + f" · {recipe}"
        seeds = ", ".join(str(r.seed) for r in g.runs)
        under = recipe if g.recipe else f"{CUSTOM} (none named: published figures of every recipe)"
        lines += [f"## {title}", "", f"{len(g.runs)} run(s), seeds {seeds}; {g.epochs} epochs. Recipe: {under}.", ""]
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
            where = f"{_where(r.published, g.recipe)} ({r.published.metric})" if r.published else ""
            if others := _other_sources(r, g.recipe):
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


def recipes_line(groups: list[Group]) -> str:
    """The recipe every group was trained under, or a marked list when the groups' recipes differ."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.recipe or CUSTOM] = counts.get(g.recipe or CUSTOM, 0) + len(g.runs)
    if len(counts) == 1:
        return f"Recipe: {next(iter(counts))} (every run; docs/recipes.md)."
    listed = "; ".join(f"{name}: {n} run(s)" for name, n in sorted(counts.items()))
    return (
        f"**Mixed recipes:** these runs were trained under {len(counts)} recipes ({listed}). Tables of different "
        "recipes differ in their training as well as their method; compare methods under one recipe "
        "(`okd compare`, docs/recipes.md)."
    )


CSV_COLUMNS = (
    "dataset model method variant recipe epochs head network deployed n_runs seeds "
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
                "recipe": g.recipe or CUSTOM,
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
