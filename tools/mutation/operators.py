"""The mutation operators: every mutant of a source file (:func:`mutants_of`), each one small change."""

from __future__ import annotations

import ast
import dataclasses

from tools.mutation import ROOT

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
