"""The published accuracy figures of the reference documents, shipped as data (``published.csv``).

One row per printed number, transcribed from those documents (``spec_row`` numbers the rows of that
transcription; cells holding several numbers, e.g. the three FFSD README runs, became one row each). Rows 306 on
continue that numbering with the SwitOKD README's Tables 4 and 7 (DML, KDCL and Vanilla on different networks;
docs/cohorts.md#switokds-heterogeneous-cells); rows 401 on are the MCL README's CIFAR-100 tables
(docs/methods.md#mcl), rows 451 on the L-MCL README's (docs/methods.md#lmcl). Columns:

- ``source``, ``table``, ``dataset``, ``method``, ``backbone``, ``metric``, ``value``, ``std``, ``note``: as printed
  (``value``/``std`` are strings, so trailing zeros survive; ``std`` is empty where none is printed);
- ``kind``: ``top1`` (top-1 %), ``gain`` (percentage points) or ``cosine`` (FFSD Table IV similarity);
- ``okd_method``, ``okd_model``: the okd method and backbone the row is about, empty where okd has none or
  the source's network is not (or not known to be) an okd backbone (CMFF's TinyImageNet ResNets and its own
  variants, FFSD's unreleased VGG-16);
- ``okd_params``: ``key=value;...`` method parameters that select the paper's variant (``*``: any value);
- ``head``: the okd eval head the number corresponds to: a head name, ``@deploy`` (the run's deployed head),
  or ``avg(<prefix>*)`` (the per-epoch mean top-1 of the heads ``<prefix>0``, ``<prefix>1``, ...);
- ``recipe``: the okd recipe (docs/recipes.md) the figure was trained under, where its source says so or the
  figure is the source's own method run by its own code (``ffsd|ffsd_paper``: either reading of FFSD's recipe);
  empty where the recipe is unstated (figures quoted from other papers). A run under a recipe is compared with
  the rows of that recipe and the unstated ones (marked as such), never with a row of another recipe.

Every repository reports the best test epoch; see ``docs/methods.md#published-figures`` for the caveats (same names for
different networks, the FFSD "Ens" oracle, CMFF's misaligned table).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from importlib import resources

COLUMNS = (
    "spec_row",
    "source",
    "table",
    "dataset",
    "method",
    "backbone",
    "metric",
    "value",
    "std",
    "kind",
    "okd_method",
    "okd_model",
    "okd_params",
    "head",
    "recipe",
    "note",
)

#: printed dataset name -> okd ``data.dataset``
DATASET_KEYS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ImageNet": "imagenet", "TinyImageNet": "tinyimagenet"}

#: method parameters that select a published variant; a row fixes them to the method's defaults unless its
#: ``okd_params`` says otherwise (so a default FFSD run is never compared with an ablation row)
VARIANT_KEYS: dict[str, tuple[str, ...]] = {
    "ffsd": ("num_students", "diversity", "self_distillation", "feature_fusion"),
    "dml": ("num_nets",),
    "dml_sl": ("num_nets",),
    "kdcl": ("models",),  # the published KDCL rows are homogeneous cohorts
    "mcl": ("num_nets", "shared_trunk", "logit_distill"),
}

#: preferred source when several rows match (lower first), then the transcription's order (``spec_row``)
SOURCE_RANK = {"FFSD paper": 0, "FFSD README": 1, "PCL reproduction README": 2, "CMFF README": 3, "SwitOKD README": 4}


@dataclass(frozen=True)
class PublishedRow:
    """One published figure (see the module docstring for the fields)."""

    spec_row: int
    source: str
    table: str
    dataset: str
    method: str
    backbone: str
    metric: str
    value: str
    std: str
    kind: str
    okd_method: str
    okd_model: str
    okd_params: str
    head: str
    recipe: str
    note: str
    params: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def value_float(self) -> float:
        return float(self.value)

    @property
    def std_float(self) -> float | None:
        return float(self.std) if self.std else None

    @property
    def dataset_key(self) -> str:
        return DATASET_KEYS.get(self.dataset, self.dataset.lower())

    @property
    def where(self) -> str:
        """``source, table`` as a short citation."""
        return f"{self.source}, {self.table}" if self.table else self.source

    def text(self) -> str:
        """``74.85 ± 0.05`` or ``74.85``."""
        return f"{self.value} ± {self.std}" if self.std else self.value

    @property
    def recipes(self) -> tuple[str, ...]:
        """The okd recipes the figure was trained under (empty: unstated)."""
        return tuple(r for r in self.recipe.split("|") if r)

    def sort_key(self) -> tuple:
        return (SOURCE_RANK.get(self.source, 9), self.spec_row)


def parse_params(text: str) -> dict[str, str]:
    """``"diversity=l2;self_distillation=none"`` -> dict (values kept as lower-case strings)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip().lower()
    return out


def _norm(value) -> str:
    return str(value).lower()


@functools.lru_cache(maxsize=1)
def load_published() -> tuple[PublishedRow, ...]:
    """Every row of ``published.csv``."""
    text = resources.files("okd.report").joinpath("published.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise RuntimeError(f"published.csv has columns {reader.fieldnames}, expected {COLUMNS}")
    rows = []
    for r in reader:
        r = dict(r)
        r["spec_row"] = int(r["spec_row"])
        rows.append(PublishedRow(**r, params=parse_params(r["okd_params"])))
    return tuple(rows)


def row_matches(
    row: PublishedRow,
    method: str,
    model: str,
    dataset: str,
    params: dict | None = None,
    defaults: dict | None = None,
    recipe: str | None = None,
) -> bool:
    """Whether ``row`` reports the okd configuration ``method``/``model``/``dataset`` with method ``params``
    under ``recipe``.

    The variant keys of the method (:data:`VARIANT_KEYS`) must equal the row's ``okd_params`` or, where it is
    silent, the method's ``defaults``; ``*`` accepts any value. Without ``params`` only names are compared. A
    row of another recipe never matches a ``recipe``; a row whose recipe is unstated matches any, and
    ``recipe=None`` (a run that names none) matches every row.
    """
    if (row.okd_method, row.okd_model, row.dataset_key) != (method, model, dataset) or not row.okd_method:
        return False
    if recipe is not None and row.recipes and recipe not in row.recipes:
        return False
    if params is None:
        return True
    expected = dict(row.params)
    for key in VARIANT_KEYS.get(method, ()):
        if key not in expected and defaults is not None and key in defaults:
            expected[key] = _norm(defaults[key])
    for key, want in expected.items():
        have = params.get(key, (defaults or {}).get(key))  # a key the run's config omits has its default
        if want != "*" and (have is None or _norm(have) != want):
            return False
    return True


def find_published(
    method: str,
    model: str,
    dataset: str,
    params: dict | None = None,
    defaults: dict | None = None,
    kind: str = "top1",
    recipe: str | None = None,
) -> list[PublishedRow]:
    """Published rows of ``kind`` for this configuration under ``recipe`` (:func:`row_matches`): the rows of that
    recipe first, then those whose recipe is unstated, each by preferred source."""
    rows = [
        r
        for r in load_published()
        if r.kind == kind and row_matches(r, method, model, dataset, params, defaults, recipe)
    ]
    return sorted(rows, key=lambda r: (recipe is not None and not r.recipes, *r.sort_key()))
