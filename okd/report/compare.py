"""``okd compare``: several methods side by side under one recipe, the table a method comparison needs.

One row per method (and variant) and backbone, pooling its seeds: the deployed head's final-epoch top-1, mean
± population std over seeds (the headline); the gain over the same recipe's baseline on the same backbone,
from the baseline runs among those given; the best epoch (selected on the test split) and the papers' own
metric (the maximum over every head but the oracles, and over epochs) as labelled extra columns; and the cost,
from the runs' own timings (training images per second, hours per run times the processes that ran it).

Runs of different recipes, or whose recipe settings differ (a run that changed the weight decay of its
recipe), are refused unless ``allow_mixed``; then the table names each row's recipe and says it is mixed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from okd.config import (
    CUSTOM,
    NOT_COMPARED,
    RECIPE_SECTIONS,
    RunConfig,
    describe_changes,
    flatten,
    recipe_deviations,
    typed_section,
)
from okd.errors import ConfigError, OKDError
from okd.report.run_results import RunResult, mean_std, read_run
from okd.report.tables import variant_of
from okd.runs.reader import expand_run_dirs

BASELINE = "baseline"
HEADLINE = "final/top1"


@dataclass
class CompareRow:
    """One method (variant) on one backbone under one recipe, pooled over its seeds."""

    dataset: str
    model: str
    method: str
    variant: str
    recipe: str  # the recipe's label in this comparison (its name; name#k where runs of one name differ)
    runs: list[RunResult]
    stats: dict[str, tuple[float, float]]  # "final/top1", "best/top1", "paper/top1" -> (mean, std)
    deploy_head: str | None
    paper_heads: list[str]  # the heads that gave the paper metric, one per run
    images_per_s: float | None
    hours: float  # per run: training + evaluation wall time x processes
    devices: list[str]
    gain: float | None = None  # final mean - the baseline's final mean (same dataset, backbone, recipe)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


@dataclass
class Comparison:
    rows: list[CompareRow]
    recipes: dict[str, str]  # label -> one-line description (the recipe and how the runs depart from it)
    mixed: bool
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- settings
def compared_settings(run: RunResult) -> dict:
    """The settings that make a recipe: the run's data, optim and train keys but where it ran, and not its seed."""
    flat = flatten({s: run.config.get(s) or {} for s in RECIPE_SECTIONS})
    return {k: v for k, v in flat.items() if k not in NOT_COMPARED}


def _fingerprint(run: RunResult) -> str:
    """What tells runs of one recipe name apart: how each departs from its recipe (so the recipe's own
    settings for other datasets do not count), or, without a known recipe, the settings themselves."""
    changes = _changes(run)
    return json.dumps(changes if changes is not None else compared_settings(run), sort_keys=True, default=str)


def _changes(run: RunResult) -> dict | None:
    """:func:`~okd.config.recipe_deviations` of the run; None without a recipe this okd ships."""
    if run.recipe is None:
        return None
    try:
        cfg = typed_section(RunConfig, {k: v for k, v in run.config.items() if k != "method"}, "")
        return recipe_deviations(cfg)
    except OKDError:  # a recipe or key this okd does not know (another version's run)
        return None


def _labels(runs: list[RunResult]) -> dict[str, str]:
    """Each run's recipe label: its recipe's name, numbered (``ffsd#1``, ``ffsd#2``) where runs naming one recipe
    differ in its settings."""
    prints: dict[str, list[str]] = {}
    for r in runs:
        seen = prints.setdefault(r.recipe_name, [])
        if (fp := _fingerprint(r)) not in seen:
            seen.append(fp)
    out = {}
    for r in runs:
        fps = prints[r.recipe_name]
        fp = _fingerprint(r)
        out[str(r.path)] = r.recipe_name if len(fps) == 1 else f"{r.recipe_name}#{fps.index(fp) + 1}"
    return out


def _departures(run: RunResult) -> str:
    """How a run departs from the recipe it names (``key=value (recipe: value)``), as one phrase."""
    if run.recipe is None:
        return "no recipe named: the runs' own settings"
    changed = _changes(run)
    if changed is None:
        return f"recipe {run.recipe} is not shipped with this okd: its departures are unknown"
    if not changed:
        return "as the recipe gives it"
    return f"changed: {describe_changes(changed)}"


def _differences(a: RunResult, b: RunResult) -> str:
    sa, sb = compared_settings(a), compared_settings(b)
    keys = sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k))
    return ", ".join(f"{k} ({sa.get(k)} vs {sb.get(k)})" for k in keys)


# -------------------------------------------------------------------------------------------------- building
def paper_metric(run: RunResult) -> tuple[float, str] | None:
    """The papers' own metric of one run: the best top-1 over every head but the oracles and the derived
    averages, and over epochs (selected on test), with the head that gave it."""
    found = [
        (value, key.split("/")[0])
        for key, value in run.best.items()
        if key.endswith("/top1") and not key.startswith(("oracle", "avg("))
    ]
    return max(found) if found else None


def _row(label: str, members: list[RunResult]) -> CompareRow:
    first = members[0]
    head = first.deploy_head
    stats = {}
    for which, source in (("final", "final"), ("best", "best")):
        values = [getattr(r, source)[f"{head}/top1"] for r in members if f"{head}/top1" in getattr(r, source)]
        if values:
            stats[f"{which}/top1"] = mean_std(values)
    papers = [p for r in members if (p := paper_metric(r)) is not None]
    if papers:
        stats["paper/top1"] = mean_std([v for v, _ in papers])
    speeds = [r.images_per_s for r in members if r.images_per_s is not None]
    hours = [r.seconds * r.world_size / 3600 for r in members]
    devices = sorted({f"{r.world_size} x {r.device or '?'}" if r.world_size > 1 else r.device or "?" for r in members})
    return CompareRow(
        dataset=first.dataset,
        model=first.model,
        method=first.method,
        variant=variant_of(first.method, first.params),
        recipe=label,
        runs=members,
        stats=stats,
        deploy_head=head,
        paper_heads=[h for _, h in papers],
        images_per_s=sum(speeds) / len(speeds) if speeds else None,
        hours=sum(hours) / len(hours),
        devices=devices,
    )


def build_comparison(run_dirs: list[str | Path], allow_mixed: bool = False) -> Comparison:
    """Read the runs and lay them out by method and backbone; refuses mixed recipes unless ``allow_mixed``."""
    runs = [read_run(p) for p in expand_run_dirs(run_dirs)]
    labels = _labels(runs)
    by_label: dict[str, list[RunResult]] = {}
    for r in runs:
        by_label.setdefault(labels[str(r.path)], []).append(r)
    mixed = len(by_label) > 1
    if mixed and not allow_mixed:
        raise ConfigError(_mixed_message(by_label))
    buckets: dict[tuple, list[RunResult]] = {}
    for r in runs:
        key = (r.dataset, labels[str(r.path)], r.model, r.method, json.dumps(r.params, sort_keys=True, default=str))
        buckets.setdefault(key, []).append(r)
    rows = [_row(key[1], members) for key, members in sorted(buckets.items(), key=lambda kv: _order(kv[0]))]
    notes = _gains(rows)
    for row in rows:
        unfinished = [r for r in row.runs if r.epochs is not None and r.epochs_done < r.epochs]
        if unfinished:
            notes.append(f"{row.method} / {row.model}: unfinished runs " + ", ".join(str(r.path) for r in unfinished))
        notes += [note for r in row.runs if (note := r.scoring_note())]  # train.eval_every: final/best over those
    recipes = {label: f"{label}: {_departures(members[0])}" for label, members in by_label.items()}
    return Comparison(rows=rows, recipes=recipes, mixed=mixed, notes=notes)


def _order(key: tuple) -> tuple:
    dataset, label, model, method, params = key
    return (dataset, label, model, method != BASELINE, method, params)


def _mixed_message(by_label: dict[str, list[RunResult]]) -> str:
    listed = "; ".join(f"{label}: {', '.join(str(r.path) for r in rs)}" for label, rs in sorted(by_label.items()))
    labels = sorted(by_label)
    first, other = by_label[labels[0]][0], by_label[labels[1]][0]
    return (
        f"these runs were trained under {len(by_label)} recipes ({listed}); a difference between them is a "
        f"difference of recipe as well as of method ({labels[0]} vs {labels[1]}: "
        f"{_differences(first, other) or 'the recipe named'}). Compare runs of one recipe (train the others "
        "with recipe=NAME), or pass --allow-mixed-recipes for a table that names each row's recipe and is "
        "marked as mixed"
    )


def _gains(rows: list[CompareRow]) -> list[str]:
    """Set each row's gain over the baseline of its dataset, backbone and recipe; notes for missing baselines."""
    notes = []
    baselines = {(r.dataset, r.model, r.recipe): r for r in rows if r.method == BASELINE and not r.variant}
    for row in rows:
        if row.method == BASELINE or HEADLINE not in row.stats:
            continue
        base = baselines.get((row.dataset, row.model, row.recipe))
        if base is None or HEADLINE not in base.stats:
            recipe = row.recipe.split("#")[0]
            how = f"okd train {row.dataset}/baseline_{row.model} recipe={recipe}" if recipe != CUSTOM else "okd train"
            notes.append(
                f"no baseline of {row.model} under {row.recipe} among these runs, so no gain for {row.method} "
                f"(train one with the same overrides as the others: {how} ...)"
            )
            continue
        row.gain = row.stats[HEADLINE][0] - base.stats[HEADLINE][0]
    return list(dict.fromkeys(notes))


# ------------------------------------------------------------------------------------------------ rendering
COLUMNS_NOTE = (
    "**top-1 final** (the headline): the deployed head's test top-1 at the last epoch, mean ± population std "
    "(ddof=0) over the seeds. **Δ baseline**: its mean minus the final mean of the baseline on the same "
    "backbone under the same recipe, among these runs. **best epoch** and **paper metric** are extra columns, "
    "both selected on the test split as the reference papers do, so optimistic: the deployed head's maximum "
    "over epochs, and the maximum over every head but the oracles (peers, leader, ensembles, fusion) and over "
    "epochs (the head that gave it in brackets). **images/s**: training throughput, mean over epochs and runs; "
    "**h per run**: training + evaluation wall time x the processes (devices) that ran it, mean over runs."
)


def _pm(stat: tuple[float, float] | None, n: int) -> str:
    if stat is None:
        return "—"
    return f"{stat[0]:.2f}" if n < 2 else f"{stat[0]:.2f} ± {stat[1]:.2f}"


def _hours(h: float) -> str:
    return f"{h:.2f}" if h >= 1 else f"{h:.2g}"


def _cells(row: CompareRow) -> list[str]:
    n = len(row.runs)
    method = row.method + (f" ({row.variant})" if row.variant else "")
    gain = "(baseline)" if row.method == BASELINE else "—" if row.gain is None else f"{row.gain:+.2f}"
    paper = _pm(row.stats.get("paper/top1"), n)
    if row.paper_heads:
        paper += f" ({', '.join(dict.fromkeys(row.paper_heads))})"
    speed = "—" if row.images_per_s is None else f"{row.images_per_s:,.0f}"
    return [
        method,
        row.model,
        row.recipe,
        f"{n} ({', '.join(map(str, row.seeds))})",
        f"{_pm(row.stats.get('final/top1'), n)} ({row.deploy_head})",
        gain,
        _pm(row.stats.get("best/top1"), n),
        paper,
        speed,
        _hours(row.hours),
        ", ".join(row.devices),
    ]


HEADER = (
    "method",
    "backbone",
    "recipe",
    "runs (seeds)",
    "top-1 final (deployed head)",
    "Δ baseline (final)",
    "top-1 best epoch (selected on test)",
    "paper metric: max over heads and epochs (selected on test)",
    "images/s",
    "h per run",
    "device",
)


def to_markdown(comparison: Comparison) -> str:
    """The comparison as Markdown: one table per dataset, the recipe named above it."""
    title = "# okd compare" + (" — MIXED RECIPES" if comparison.mixed else "")
    lines = [title, ""]
    if comparison.mixed:
        lines += [
            f"**Mixed recipes:** these rows were trained under {len(comparison.recipes)} recipes; a difference "
            "between rows of different recipes is a difference of recipe as well as of method.",
            "",
        ]
    lines += ["Recipe" + ("s" if comparison.mixed else "") + " (docs/recipes.md):", ""]
    lines += [f"- {text}" for _, text in sorted(comparison.recipes.items())] + [""]
    for dataset in dict.fromkeys(r.dataset for r in comparison.rows):
        lines += [f"## {dataset}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in comparison.rows if r.dataset == dataset]
        lines.append("")
    lines += [COLUMNS_NOTE, ""]
    lines += [f"Note: {note}." for note in comparison.notes]
    return "\n".join(lines).rstrip() + "\n"


CSV_COLUMNS = (
    "dataset model method variant recipe mixed n_runs seeds deploy_head final_top1_mean final_top1_std "
    "gain_over_baseline best_top1_mean best_top1_std paper_top1_mean paper_top1_std paper_heads "
    "images_per_s hours_per_run devices"
).split()


def _num(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else repr(float(x))


def to_csv(comparison: Comparison) -> str:
    """One CSV row per table row (full precision; std is ddof=0; best and paper metric selected on test)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in comparison.rows:
        row = {
            "dataset": r.dataset,
            "model": r.model,
            "method": r.method,
            "variant": r.variant,
            "recipe": r.recipe,
            "mixed": int(comparison.mixed),
            "n_runs": len(r.runs),
            "seeds": " ".join(map(str, r.seeds)),
            "deploy_head": r.deploy_head,
            "gain_over_baseline": _num(r.gain),
            "paper_heads": " ".join(r.paper_heads),
            "images_per_s": _num(r.images_per_s),
            "hours_per_run": _num(r.hours),
            "devices": "; ".join(r.devices),
        }
        for which in ("final", "best", "paper"):
            stat = r.stats.get(f"{which}/top1")
            row[f"{which}_top1_mean"] = _num(stat[0] if stat else None)
            row[f"{which}_top1_std"] = _num(stat[1] if stat else None)
        writer.writerow(row)
    return buf.getvalue()


def compare(
    run_dirs: list[str | Path],
    allow_mixed: bool = False,
    markdown: str | Path | None = None,
    csv_path: str | Path | None = None,
) -> str:
    """Build the comparison, write the requested files and return the Markdown."""
    comparison = build_comparison(run_dirs, allow_mixed)
    text = to_markdown(comparison)
    if markdown:
        Path(markdown).write_text(text, encoding="utf-8")
    if csv_path:
        Path(csv_path).write_text(to_csv(comparison), encoding="utf-8")
    return text
