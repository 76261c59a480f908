#!/usr/bin/env python3
"""Mutation testing of okd's core files: does the test suite notice a small wrong change?

An AST-based mutator (no third-party tool: mutmut 3 and cosmic-ray 8 install, but neither deletes statements nor
swaps call arguments, the mutants that matter most here). Each mutant is one change to one file:

  delete        a statement replaced by ``pass`` (a call such as ``f.flush()``/``os.fsync``/``zero_grad``, an
                assignment, a ``raise``/``return``, a whole ``if``/``for``/``with`` block: the guard behind a
                promise)
  detach        ``x.detach()`` -> ``x``
  context       one context manager of a ``with`` removed (``torch.no_grad()``, ``deferred_signals()``, ...)
  decorator     a grad-mode decorator removed (``@torch.no_grad()``)
  swap_args     two neighbouring positional arguments of a call swapped
  mean_sum      ``.mean`` <-> ``.sum`` (and ``torch.mean``/``torch.sum``)
  dim           ``dim=k`` -> ``dim=k+1`` (``dim=-1`` -> ``dim=-2``)
  off_by_one    ``range(n)`` -> ``range(n - 1)``, ``range(a, b)`` -> ``range(a + 1, b)``, slice bounds +-1
  compare       ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``in`` <-> ``not in``, ``is`` <-> ``is not``
  early_return  ``return`` as the first statement of a function that raises (a validator or a guard)
  drop_factor   ``a * b`` -> ``a``, ``a / b`` -> ``a`` (a removed ``T*T``, a removed normalisation)
  token         single-token swaps: ``and`` <-> ``or``, ``+`` <-> ``-``, ``*`` <-> ``/``, ``not x`` -> ``x``,
                ``True`` <-> ``False``, a number changed (0 -> 1, 1 -> 0, k -> k+1, x -> 2x)

Docstrings, f-strings, annotations, string constants, class bodies (dataclass fields) and ``__all__`` are never
mutated. A mutant whose AST equals the
original, or that does not compile, is dropped.

Every source file maps to the test files that cover it (:data:`TESTS`, fast files first). For each mutant the
tool writes the mutated file into a private copy of the repository and runs ``pytest -x -q`` on those test files
only, with a timeout (a multiple of the unmutated run's time): **killed** (a test failed), **timeout** (counted as
killed) or **survived**. The unmutated runs must pass first. The sample is drawn with a seed, by operator (the
``--mix`` weights), evenly over the files.

Usage (from the repository root; see docs/development.md)::

    python tools/mutation.py list okd/runs/store.py                 # every mutant of a file, no run
    python tools/mutation.py run --files core --total 120 --seed 7 --out results/mutation/my-run
    python tools/mutation.py run --files okd/runs/store.py --operators delete,early_return --out /tmp/m
    python tools/mutation.py run --guards results/mutation/guards/guards.tsv --out results/mutation/guards
    python tools/mutation.py show okd/runs/store.py:245:16:delete:0   # the diff of one mutant
    python tools/mutation.py report results/mutation/my-run         # summary.md again (after triage edits)

``run`` writes ``OUT/mutants.csv`` (id, file, line, operator, change, status, seconds, tests), ``OUT/summary.md``
(counts per operator and file, kill rates, the mix, hardware, versions, the command) and ``OUT/survivors.md``.
Triage goes in ``OUT/triage.csv`` (id, verdict, reason; verdict ``equivalent`` leaves a mutant out of the
non-equivalent kill rate; ``fixed`` names the test added since); ``report`` recomputes the summary with it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONTRACT, SHARED, FAULTS = "methods/test_contract.py", "methods/test_shared.py", "runs/test_faults.py"
TRAINING = "engine/test_training.py"
#: source file -> the test files that cover it (under tests/), fastest first (pytest stops at the first failure)
TESTS: dict[str, list[str]] = {
    "okd/config.py": ["cli/test_config.py", "cli/test_cli_parsing.py", "runs/test_resume_policy.py"],
    "okd/io.py": ["runs/test_io.py", "runs/test_run_store.py", "runs/test_safe_loading.py", FAULTS],
    "okd/data/cifar.py": ["data/test_data.py"],
    "okd/data/device_loader.py": ["data/test_data.py", "engine/test_last_batch.py"],
    "okd/data/builder.py": ["data/test_data.py", "data/test_folder_data.py"],
    "okd/nn/losses.py": ["models/test_nn_blocks.py", SHARED, "methods/test_ffsd.py", "methods/test_cmff.py"],
    "okd/nn/diversity.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py"],
    "okd/nn/fusion.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py", SHARED],
    "okd/nn/self_distillation.py": ["models/test_nn_blocks.py", "methods/test_ffsd.py"],
    "okd/nn/cross_attention.py": ["methods/test_cmff.py"],
    "okd/nn/rotation.py": ["methods/test_cmff.py"],
    "okd/methods/base.py": [CONTRACT, SHARED],
    "okd/methods/build.py": ["cli/test_config.py", CONTRACT],
    "okd/methods/branch_base.py": [CONTRACT, SHARED, "methods/test_one.py"],
    "okd/methods/baseline.py": [CONTRACT, SHARED],
    "okd/methods/individual.py": [CONTRACT, SHARED],
    "okd/methods/one.py": ["methods/test_one.py", CONTRACT, SHARED],
    "okd/methods/cl_ilr.py": ["methods/test_cl_ilr.py", CONTRACT, SHARED],
    "okd/methods/okddip.py": ["methods/test_okddip.py", CONTRACT, SHARED],
    "okd/methods/ffl.py": ["methods/test_ffl.py", CONTRACT, SHARED],
    "okd/methods/dml.py": ["methods/test_dml.py", CONTRACT, SHARED],
    "okd/methods/leader_sl.py": ["methods/test_leader_sl.py", CONTRACT, SHARED],
    "okd/methods/kd.py": ["methods/test_kd.py", CONTRACT, SHARED, "runs/test_safe_loading.py"],
    "okd/methods/kdcl.py": ["methods/test_kdcl.py", CONTRACT, SHARED],
    "okd/methods/pcl.py": ["methods/test_pcl.py", CONTRACT, SHARED],
    "okd/methods/ffsd.py": ["methods/test_ffsd.py", CONTRACT],
    "okd/methods/cmff.py": ["methods/test_cmff.py", CONTRACT],
    "okd/methods/cmff_net.py": ["methods/test_cmff.py", CONTRACT],
    "okd/engine/step.py": ["engine/test_engine_mutants.py", "methods/test_dml.py", TRAINING],
    "okd/engine/epoch.py": ["engine/test_engine_mutants.py", TRAINING],
    "okd/engine/last_batch.py": ["engine/test_last_batch.py"],
    "okd/engine/evaluate.py": ["runs/test_run_store.py", TRAINING],
    "okd/engine/schedules.py": ["engine/test_schedules.py"],
    "okd/engine/builder.py": ["engine/test_schedules.py", SHARED],
    "okd/engine/seeding.py": ["engine/test_engine_mutants.py", TRAINING],
    "okd/engine/trainer.py": [
        "engine/test_engine_mutants.py", "runs/test_resume_policy.py", FAULTS, TRAINING, "engine/test_distributed.py"
    ],
    "okd/runs/records.py": ["runs/test_run_store.py", "runs/test_safe_loading.py", FAULTS],
    "okd/runs/metrics.py": ["runs/test_run_store.py", "runs/test_resume_policy.py", FAULTS],
    "okd/runs/store.py": ["runs/test_run_store.py", FAULTS],
    "okd/runs/resume_policy.py": ["runs/test_resume_policy.py", FAULTS],
    "okd/runs/reader.py": ["runs/test_reader.py", FAULTS, "runs/test_safe_loading.py"],
}  # fmt: skip

#: ``--files core``: config, data, nn, methods, engine, runs (and io, the leaf the run folder stands on)
CORE = sorted(TESTS)

OPERATORS = (
    "delete",
    "detach",
    "context",
    "decorator",
    "swap_args",
    "mean_sum",
    "dim",
    "off_by_one",
    "compare",
    "early_return",
    "drop_factor",
    "token",
)
#: the default mix: the share of the sample drawn from each operator's mutants
DEFAULT_MIX = {
    "delete": 0.24,
    "early_return": 0.08,
    "swap_args": 0.08,
    "compare": 0.12,
    "token": 0.16,
    "off_by_one": 0.06,
    "drop_factor": 0.06,
    "context": 0.05,
    "detach": 0.05,
    "decorator": 0.02,
    "mean_sum": 0.04,
    "dim": 0.04,
}
GRAD_DECORATORS = ("no_grad", "inference_mode", "enable_grad")
DELETABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise, ast.Return, ast.Assert, ast.If, ast.For)
DELETABLE += (ast.While, ast.With, ast.Try, ast.Delete)


@dataclasses.dataclass
class Mutant:
    file: str
    line: int
    col: int
    operator: str
    variant: int
    before: str
    after: str
    source: str = dataclasses.field(repr=False, default="")  # the whole mutated file

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.col}:{self.operator}:{self.variant}"

    @property
    def change(self) -> str:
        return f"{_one_line(self.before)} -> {_one_line(self.after)}"


def _one_line(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- the mutator
class _Source:
    """A file's bytes with (line, column) -> offset, the AST's coordinates (columns are UTF-8 byte offsets)."""

    def __init__(self, text: str) -> None:
        self.data = text.encode("utf-8")
        self.starts = [0]
        for line in self.data.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def text(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode("utf-8")

    def replace(self, edits: list[tuple[int, int, str]]) -> str:
        data = self.data
        for a, b, new in sorted(edits, reverse=True):
            data = data[:a] + new.encode("utf-8") + data[b:]
        return data.decode("utf-8")

    def indent_of(self, node: ast.AST) -> str:
        line = self.data[self.starts[node.lineno - 1] : self.starts[node.lineno]].decode("utf-8")
        return line[: len(line) - len(line.lstrip())]


def _is_docstring(stmt: ast.stmt, body: list[ast.stmt]) -> bool:
    return (
        stmt is body[0]
        and isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: inside f-strings, annotations, docstrings and decorators."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            mark(node)
        elif isinstance(node, ast.arg | ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
            for deco in node.decorator_list:
                mark(deco)
        elif isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                mark(deco)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0], body):
            mark(body[0])
    return skip


def _reindent(code: str, indent: str) -> str:
    lines = code.splitlines()
    return "\n".join([lines[0], *(indent + line for line in lines[1:])])


def _raises(fn: ast.FunctionDef) -> bool:
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _number_swap(value: object) -> object | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return {0: 1, 1: 0}.get(value, value + 1)
    return 1.0 if value == 0 else value * 2


SWAPS_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
SWAPS_CMP |= {ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SWAPS_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


def mutants_of(path: str) -> list[Mutant]:
    """Every mutant of ``path`` (relative to the repository root), in source order."""
    text = (ROOT / path).read_text(encoding="utf-8")
    tree = ast.parse(text)
    src = _Source(text)
    skip = _skipped_nodes(tree)
    original = ast.dump(tree)
    found: list[Mutant] = []
    seen: set[str] = set()

    def add(node: ast.AST, operator: str, edits: list[tuple[int, int, str]], after: str, before: str | None = None):
        mutated = src.replace(edits)
        try:
            new_tree = ast.parse(mutated)
            compile(new_tree, path, "exec")
        except SyntaxError:
            return
        if ast.dump(new_tree) == original or mutated in seen:
            return
        seen.add(mutated)
        variant = sum(1 for m in found if (m.line, m.col, m.operator) == (node.lineno, node.col_offset, operator))
        before = src.text(node) if before is None else before
        found.append(Mutant(path, node.lineno, node.col_offset, operator, variant, before, after, mutated))

    def replace_node(node: ast.AST, operator: str, new: str) -> None:
        a, b = src.span(node)
        add(node, operator, [(a, b, new)], new)

    def expr(node: ast.AST) -> str:
        return f"({ast.unparse(node)})"

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        # -- statements: delete, early_return, context, decorator
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or isinstance(node, ast.ClassDef):  # a class body: its fields, methods
                continue
            for stmt in body:
                if id(stmt) in skip or not isinstance(stmt, DELETABLE) or _is_docstring(stmt, body):
                    continue
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in stmt.targets):
                    continue  # the export list: no behaviour
                a, b = src.span(stmt)
                add(stmt, "delete", [(a, b, "pass")], "pass")
        if isinstance(node, ast.FunctionDef) and _raises(node) and not node.name.startswith("__"):
            body = node.body
            first = body[1] if _is_docstring(body[0], body) and len(body) > 1 else body[0]
            if not _is_docstring(first, body):
                at = src.offset(first.lineno, first.col_offset)
                indent = src.indent_of(first)
                add(first, "early_return", [(at, at, "return\n" + indent)], "return", before=f"def {node.name}")
        if isinstance(node, ast.With):
            for i, item in enumerate(node.items):
                if item.optional_vars is not None:
                    continue
                if len(node.items) > 1:
                    rest = [it for j, it in enumerate(node.items) if j != i]
                    new = ast.With(items=rest, body=node.body, type_comment=None)
                else:
                    new = ast.If(test=ast.Constant(True), body=node.body, orelse=[])
                ast.fix_missing_locations(new)
                a, b = src.span(node)
                code = _reindent(ast.unparse(new), src.indent_of(node))
                add(node, "context", [(a, b, code)], f"without {ast.unparse(item.context_expr)}")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:
                name = ast.unparse(deco)
                if any(g in name for g in GRAD_DECORATORS):
                    line_start = src.starts[deco.lineno - 1]
                    line_end = src.starts[deco.lineno]
                    add(deco, "decorator", [(line_start, line_end, "")], "(removed)", before="@" + name)
        # -- expressions
        if not isinstance(node, ast.expr) or isinstance(getattr(node, "ctx", None), ast.Store | ast.Del):
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "detach" and not node.args and not node.keywords:
                replace_node(node, "detach", src.text(func.value))
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(positional) == len(node.args) >= 2:
                for i in range(min(len(node.args) - 1, 2)):
                    x, y = node.args[i], node.args[i + 1]
                    if src.text(x) != src.text(y):
                        (xa, xb), (ya, yb) = src.span(x), src.span(y)
                        edits = [(xa, xb, src.text(y)), (ya, yb, src.text(x))]
                        add(x, "swap_args", edits, f"args {i}<->{i + 1}", before=src.text(node))
            if isinstance(func, ast.Attribute) and func.attr in ("mean", "sum"):
                other = "sum" if func.attr == "mean" else "mean"
                a, b = src.span(func)
                add(func, "mean_sum", [(b - len(func.attr), b, other)], other, before=func.attr)
            for kw in node.keywords:
                if kw.arg in ("dim", "axis") and id(kw.value) not in skip:
                    value = kw.value
                    k = None
                    if isinstance(value, ast.Constant) and isinstance(value.value, int):
                        k = value.value
                    elif isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
                        if isinstance(value.operand, ast.Constant) and isinstance(value.operand.value, int):
                            k = -value.operand.value
                    if k is not None:
                        replace_node(value, "dim", str(k + 1 if k >= 0 else k - 1))
            if isinstance(func, ast.Name) and func.id == "range" and node.args and not node.keywords:
                if len(node.args) == 1:
                    replace_node(node.args[0], "off_by_one", f"{expr(node.args[0])} - 1")
                else:
                    replace_node(node.args[0], "off_by_one", f"{expr(node.args[0])} + 1")
                    replace_node(node.args[1], "off_by_one", f"{expr(node.args[1])} - 1")
        elif isinstance(node, ast.Slice):
            if node.lower is not None:
                replace_node(node.lower, "off_by_one", f"{expr(node.lower)} + 1")
            if node.upper is not None:
                replace_node(node.upper, "off_by_one", f"{expr(node.upper)} - 1")
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAPS_CMP:
                    ops = list(node.ops)
                    ops[i] = SWAPS_CMP[type(op)]()
                    replace_node(node, "compare", expr(ast.Compare(node.left, ops, node.comparators)))
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Div) and _is_text(node.right):
                continue  # a path join (folder / "name"), not arithmetic
            if isinstance(node.op, ast.Mult | ast.Div):
                replace_node(node, "drop_factor", expr(node.left))
            if type(node.op) in SWAPS_BIN:
                replace_node(node, "token", expr(ast.BinOp(node.left, SWAPS_BIN[type(node.op)](), node.right)))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            replace_node(node, "token", expr(ast.BoolOp(other, node.values)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            replace_node(node, "token", expr(node.operand))
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                replace_node(node, "token", str(not node.value))
            else:
                new = _number_swap(node.value)
                if new is not None:
                    replace_node(node, "token", repr(new))
    return sorted(found, key=lambda m: (m.line, m.col, m.operator, m.variant))


# ------------------------------------------------------------------------------------------------- sampling
def sample(mutants: list[Mutant], total: int | None, mix: dict[str, float], seed: int) -> list[Mutant]:
    """``total`` mutants drawn with ``seed``: each operator's share from ``mix`` (its unused share passed on to
    the others), each operator's draw spread evenly over the files (round-robin over shuffled per-file lists)."""
    if total is None or total >= len(mutants):
        return list(mutants)
    rng = random.Random(seed)
    by_op: dict[str, dict[str, list[Mutant]]] = defaultdict(lambda: defaultdict(list))
    for m in mutants:
        by_op[m.operator][m.file].append(m)
    weights = {op: w for op, w in mix.items() if op in by_op and w > 0}
    quota: dict[str, int] = {}
    left, pool = total, dict(weights)
    while left > 0 and pool:
        share = sum(pool.values())
        grant = {op: max(1, round(left * w / share)) for op, w in pool.items()}
        for op in sorted(pool):
            size = sum(len(v) for v in by_op[op].values())
            give = min(grant[op], size - quota.get(op, 0), left)
            quota[op] = quota.get(op, 0) + give
            left -= give
        pool = {op: w for op, w in pool.items() if quota.get(op, 0) < sum(len(v) for v in by_op[op].values())}
    chosen: list[Mutant] = []
    for op in sorted(quota):
        files = {f: rng.sample(ms, len(ms)) for f, ms in sorted(by_op[op].items())}
        order = rng.sample(sorted(files), len(files))
        picked = 0
        while picked < quota[op]:
            for f in order:
                if files[f] and picked < quota[op]:
                    chosen.append(files[f].pop())
                    picked += 1
    return sorted(chosen, key=lambda m: (m.file, m.line, m.col, m.operator, m.variant))


def parse_mix(text: str | None) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        op, _, w = part.partition("=")
        if op not in OPERATORS:
            raise SystemExit(f"unknown operator {op!r}; choose from {', '.join(OPERATORS)}")
        mix[op] = float(w or 1)
    return mix


# -------------------------------------------------------------------------------------------------- running
#: run in the sandbox before anything else: an editable install of okd (a meta-path finder mapping ``okd`` to
#: another checkout) would otherwise serve any module missing from the copy, silently, from that checkout
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _default_signals() -> None:
    """In the test process, SIGINT and SIGTERM as in a terminal: a tool started in the background (``cmd &``)
    passes SIGINT on ignored, and the tests of held signals would then see nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _not_copied(folder: str, names: list[str]) -> set[str]:
    """What the sandbox copy leaves out: VCS data, caches, and run folders at the repository root."""
    skip = {n for n in names if n in (".git", "__pycache__", ".pytest_cache", ".ruff_cache") or n.endswith(".pyc")}
    if Path(folder) == ROOT:
        skip |= {n for n in names if n in ("runs", ".venv", ".ci-venv", ".ci-venv-timm", "build", "dist")}
    return skip


class Sandbox:
    """A private copy of the repository (tracked and untracked files, no .git/caches) the mutants are written
    into, and the real CIFAR-10 subset the end-to-end tests read, made once."""

    def __init__(self, keep: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="okd-mutation-"))
        self.repo = self.base / "repo"
        shutil.copytree(ROOT, self.repo, ignore=_not_copied)
        self.keep = keep
        site = self.base / "site"  # sitecustomize: okd is imported from the copy only
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.repo), str(site)]),
            "PYTHONDONTWRITEBYTECODE": "1",  # a mutant and the original may share a size and an mtime second
            "OKD_CIFAR10": self._cifar10(),
        }
        probe = "import okd.runs.store, okd.configs; print(okd.runs.store.__file__, *okd.configs.__path__)"
        run = subprocess.run([sys.executable, "-c", probe], cwd=self.repo, env=self.env, capture_output=True, text=True)
        where = run.stdout
        if not where.split() or not all(p.startswith(str(self.repo)) for p in where.split()):
            raise SystemExit(f"the sandbox imports okd from outside its copy ({where.strip()!r}); see SITECUSTOMIZE")

    def _cifar10(self) -> str:
        if os.environ.get("OKD_CIFAR10"):
            return os.environ["OKD_CIFAR10"]
        shared = ROOT.parent / "shared" / "data"
        out = self.base / "cifar10"
        script = shared / "make_cifar10.py"
        if script.is_file():
            subprocess.run(
                [sys.executable, str(script), str(out), "--limit-train", "2000", "--limit-test", "500"],
                check=True,
                capture_output=True,
            )
            return str(out)
        return ""

    def pytest(self, tests: list[str], timeout: float) -> tuple[str, float, str]:
        """``pytest -x -q`` of ``tests`` in the copy: (passed | failed | timeout, seconds, last line)."""
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=self.repo, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, preexec_fn=_default_signals,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timeout", time.perf_counter() - start, ""
        lines = [line for line in out.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, last

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


FIELDS = ["id", "file", "line", "operator", "change", "status", "seconds", "tests", "detail"]


def run(args: argparse.Namespace) -> None:
    files = resolve_files(args.files)
    mix = parse_mix(args.mix)
    if args.operators:
        mix = {op: mix.get(op, 1.0) for op in args.operators.split(",")}
    promises: dict[str, str] = {}
    if args.guards:
        promises = resolve_guards(Path(args.guards))
        args.ids = ",".join(promises)
    if args.ids:
        wanted = _read_ids(args.ids)
        files = sorted({i.split(":")[0] for i in wanted})
        every = [m for f in files for m in mutants_of(f) if m.id in wanted]
        missing = sorted(set(wanted) - {m.id for m in every})
        if missing:
            raise SystemExit(f"no such mutants (the source moved? `list` shows today's ids): {', '.join(missing)}")
        chosen = every
    else:
        every = [m for f in files for m in mutants_of(f) if m.operator in mix]
        chosen = sample(every, args.total, mix, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(every)} mutants over {len(files)} files; running {len(chosen)} (seed {args.seed})", flush=True)
    box = Sandbox(keep=args.keep)
    rows: list[dict] = []
    started = time.time()
    try:
        baseline = baselines(box, sorted({t for m in chosen for t in tests_of(m.file)}), out, args.max_baseline)
        for i, m in enumerate(chosen, 1):
            tests = tests_of(m.file)
            target = box.repo / m.file
            original = target.read_text(encoding="utf-8")
            limit = args.timeout_factor * sum(baseline[t] for t in tests) + args.timeout_extra
            try:
                target.write_text(m.source, encoding="utf-8")
                status, secs, last = box.pytest(tests, timeout=limit)
            finally:
                target.write_text(original, encoding="utf-8")
            verdict = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[status]
            rows.append(
                {
                    "id": m.id, "file": m.file, "line": m.line, "operator": m.operator, "change": m.change,
                    "status": verdict, "seconds": f"{secs:.1f}", "tests": " ".join(tests), "detail": last[:160],
                }
            )  # fmt: skip
            print(f"[{i}/{len(chosen)}] {verdict:8s} {m.id}  {m.change}", flush=True)
            write_csv(out / "mutants.csv", rows)
    finally:
        box.close()
    meta = {
        "command": " ".join(["python", "tools/mutation.py", *sys.argv[1:]]),
        "seed": "none" if args.ids else args.seed,
        "mix": "none: the listed mutants, no sampling" if args.ids else mix,
        "population": dict(Counter(m.operator for m in every)),
        "files": files,
        "wall_s": time.time() - started,
    }
    write_meta(out / "run.txt", meta)
    if promises:
        write_guards(out / "guards.md", promises, rows)
    report(out)


def resolve_guards(path: Path) -> dict[str, str]:
    """``{mutant id: promise}`` from a guards file: tab-separated rows ``promise, file, operator, the start of the
    change (as ``list`` prints it), the number of mutants it must match[, a text of their source line]``. A row
    that matches another number of mutants (the guard moved or changed) stops the run, naming the row."""
    found: dict[str, str] = {}
    of_file: dict[str, list[Mutant]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        promise, file, operator, start, count, *within = line.split("\t")
        source = (ROOT / file).read_text(encoding="utf-8").splitlines()
        if file not in of_file:
            of_file[file] = mutants_of(file)
        hits = [
            m
            for m in of_file[file]
            if m.operator == operator and m.change.startswith(start) and (not within or within[0] in source[m.line - 1])
        ]
        if len(hits) != int(count):
            raise SystemExit(f"{path}:{number}: {len(hits)} mutants match, not {count}: {line}")
        found.update({m.id: promise for m in hits})
    return found


def write_guards(path: Path, promises: dict[str, str], rows: list[dict]) -> None:
    status = {r["id"]: r["status"] for r in rows}
    change = {r["id"]: r["change"] for r in rows}
    lines = ["# The guards behind the README's promises", "", "| promise | mutant | change | status |"]
    lines.append("|---|---|---|---|")
    for mid, promise in promises.items():
        lines.append(f"| {promise} | `{mid}` | `{change.get(mid, '')}` | {status.get(mid, 'not run')} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def baselines(box: Sandbox, tests: list[str], out: Path, limit: float) -> dict[str, float]:
    """Seconds of each unmutated test file (which must pass), kept in ``OUT/baseline.csv`` for a rerun."""
    path = out / "baseline.csv"
    known: dict[str, float] = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            known = {row["tests"]: float(row["seconds"]) for row in csv.DictReader(f)}
    for t in tests:
        if t in known:
            continue
        status, secs, last = box.pytest([t], timeout=limit)
        if status != "passed":
            raise SystemExit(f"the unmutated {t} does not pass ({status}): {last}")
        known[t] = secs
        print(f"baseline {t}: {secs:.1f} s", flush=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tests", "seconds"])
            writer.writerows(sorted(known.items()))
    return known


def tests_of(file: str) -> list[str]:
    return [f"tests/{t}" for t in TESTS[file]]


def _read_ids(spec: str) -> list[str]:
    """Mutant ids from a file (one per line, ``#`` comments) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line]
    return [i.strip() for i in spec.split(",") if i.strip()]


def resolve_files(spec: list[str]) -> list[str]:
    files: list[str] = []
    for item in spec:
        if item == "core":
            files += CORE
        elif item.endswith("/") or (ROOT / item).is_dir():
            files += [f for f in CORE if f.startswith(item.rstrip("/") + "/")]
        elif item in TESTS:
            files.append(item)
        else:
            raise SystemExit(f"{item}: no test files mapped (add it to TESTS in tools/mutation.py)")
    return sorted(dict.fromkeys(files))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_meta(path: Path, meta: dict) -> None:
    lines = [f"{k}: {v}" for k, v in meta.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_triage(folder: Path) -> dict[str, tuple[str, str]]:
    path = folder / "triage.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: (row["verdict"], row["reason"]) for row in csv.DictReader(f)}


def _environment() -> list[str]:
    import numpy
    import torch

    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:10]
    except OSError:
        cpu = [platform.processor()]
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"pytest {_version('pytest')}, {platform.platform()}",
        *cpu,
    ]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


def report(folder: Path) -> None:
    """summary.md and survivors.md of a run folder, from mutants.csv, run.txt and triage.csv."""
    folder = Path(folder)
    with open(folder / "mutants.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    triage = read_triage(folder)
    meta = (folder / "run.txt").read_text(encoding="utf-8") if (folder / "run.txt").is_file() else ""

    def counts(selected: list[dict]) -> tuple[int, int, int, int, int]:
        n = len(selected)
        killed = sum(r["status"] == "killed" for r in selected)
        timeout = sum(r["status"] == "timeout" for r in selected)
        survived = [r for r in selected if r["status"] == "survived"]
        equivalent = sum(triage.get(r["id"], ("", ""))[0] == "equivalent" for r in survived)
        return n, killed, timeout, len(survived), equivalent

    def rates(n, killed, timeout, survived, equivalent) -> str:
        raw = 100 * (killed + timeout) / n if n else 0.0
        non_eq = n - equivalent
        kept = 100 * (killed + timeout) / non_eq if non_eq else 0.0
        return f"| {n} | {killed} | {timeout} | {survived} | {equivalent} | {raw:.1f} % | {kept:.1f} % |"

    head = "| | mutants | killed | timeout | survived | of which equivalent | killed, raw | killed, non-equivalent |"
    rule = "|---|---|---|---|---|---|---|---|"
    lines = ["# Mutation run", "", "```", meta.rstrip(), "```", "", head, rule]
    lines.append("| **all** " + rates(*counts(rows)))
    lines += ["", "## By operator", "", head, rule]
    for op in OPERATORS:
        sel = [r for r in rows if r["operator"] == op]
        if sel:
            lines.append(f"| {op} " + rates(*counts(sel)))
    lines += ["", "## By file", "", head, rule]
    for f in sorted({r["file"] for r in rows}):
        lines.append(f"| `{f}` " + rates(*counts([r for r in rows if r["file"] == f])))
    lines += ["", "## Environment", "", "```", *_environment(), "```", ""]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    survivors = ["# Surviving mutants", "", "| id | change | verdict | reason |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "survived":
            verdict, reason = triage.get(r["id"], ("untriaged", ""))
            survivors.append(f"| `{r['id']}` | `{r['change']}` | {verdict} | {reason} |")
    (folder / "survivors.md").write_text("\n".join(survivors) + "\n", encoding="utf-8")
    print((folder / "summary.md").read_text(encoding="utf-8").split("## By operator")[0])


def list_mutants(args: argparse.Namespace) -> None:
    for f in resolve_files(args.files):
        ms = mutants_of(f)
        for m in ms:
            if not args.operators or m.operator in args.operators.split(","):
                print(f"{m.id}\t{m.change}")
        print(f"# {f}: {len(ms)} mutants {dict(Counter(m.operator for m in ms))}", file=sys.stderr)


def show(args: argparse.Namespace) -> None:
    """The diff of one mutant (by id)."""
    import difflib

    file = args.id.split(":")[0]
    for m in mutants_of(file):
        if m.id == args.id:
            original = (ROOT / file).read_text(encoding="utf-8").splitlines(keepends=True)
            sys.stdout.writelines(difflib.unified_diff(original, m.source.splitlines(keepends=True), file, file))
            return
    raise SystemExit(f"no mutant {args.id}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print every mutant of the files")
    p.add_argument("files", nargs="+", help="source files, folders under okd/, or 'core'")
    p.add_argument("--operators", help="comma-separated operators (default: all)")
    p.set_defaults(func=list_mutants)
    p = sub.add_parser("show", help="the diff of one mutant")
    p.add_argument("id")
    p.set_defaults(func=show)
    p = sub.add_parser("run", help="run a seeded sample of mutants against their tests")
    p.add_argument("--files", nargs="+", default=["core"], help="source files, folders under okd/, or 'core'")
    p.add_argument("--total", type=int, help="mutants to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", help="operator weights, e.g. delete=3,compare=1 (default: DEFAULT_MIX)")
    p.add_argument("--operators", help="only these operators (comma-separated)")
    p.add_argument("--ids", help="run exactly these mutants: a file of ids (one a line) or a comma-separated list")
    p.add_argument("--guards", help="run the mutants a guards file names (see resolve_guards), with guards.md")
    p.add_argument("--out", required=True, help="folder for mutants.csv, summary.md, survivors.md")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="a mutant's limit: factor x baseline + extra")
    p.add_argument("--timeout-extra", type=float, default=20.0)
    p.add_argument("--max-baseline", type=float, default=1800.0, help="limit of an unmutated run (s)")
    p.add_argument("--keep", action="store_true", help="keep the sandbox copy")
    p.set_defaults(func=run)
    p = sub.add_parser("report", help="summary.md and survivors.md again (after editing triage.csv)")
    p.add_argument("folder")
    p.set_defaults(func=lambda a: report(Path(a.folder)))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
