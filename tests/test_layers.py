"""The shape of the code: okd imports its own modules at the top of a file only, and its import graph has no cycle.

The layer order itself (which package may import which) is import-linter's layers contract in pyproject.toml,
run by .ci/run (`lint-imports`); docs/layers.md explains it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "okd"
#: okd modules that are an optional extra themselves (they import it at their top), imported where they are used
EXTRA_MODULES = {"okd.report.launch": "submitit"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported okd module, line, inside a function)`` for every import of an okd module in ``path`` (those
    under ``if TYPE_CHECKING:`` are for annotations and never run)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            inside = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                if base == "okd" or base.startswith("okd."):
                    targets = [f"{base}.{a.name}" for a in child.names]
                    found.extend((t if _exists(t) else base, child.lineno, inside) for t in targets)
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inside) for a in child.names if a.name.split(".")[0] == "okd")
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = {target for target, _, _ in _imports(path)}
    return graph


def test_okd_modules_are_imported_at_the_top_of_a_file_only():
    """A function-level import of an okd module hides a dependency (often an upward one, to dodge a cycle);
    only optional extras (matplotlib, onnx, safetensors, submitit, tensorboard, timm) are imported where used."""
    nested = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target, line, inside in _imports(path)
        if inside and target not in EXTRA_MODULES
    ]
    assert nested == []


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target] if target in path else [module, target]
            if state.get(target) is None and (found := cycle_from(target, path + [target])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if state.get(module) is None and (found := cycle_from(module, [module])):
            raise AssertionError("import cycle: " + " -> ".join(found))


def test_the_checks_see_a_nested_import_and_a_cycle(tmp_path, monkeypatch):
    """The two checks above can fail: a function-level import is reported, and a two-module cycle is found."""
    source = "def f():\n    from okd.errors import OKDError\n    return OKDError\n"
    (tmp_path / "okd").mkdir()
    (tmp_path / "okd" / "__init__.py").write_text("")
    (tmp_path / "okd" / "errors.py").write_text("from okd import io\n")
    (tmp_path / "okd" / "io.py").write_text("from okd import errors\n" + source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "okd")
    assert [(t, inside) for t, _, inside in _imports(tmp_path / "okd" / "io.py")] == [
        ("okd.errors", False),
        ("okd.errors", True),
    ]
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as exc:
        assert "okd.errors -> okd.io -> okd.errors" in str(exc) or "okd.io -> okd.errors -> okd.io" in str(exc)
    else:
        raise AssertionError("the cycle was not found")


def test_the_command_line_starts_without_any_optional_extra():
    """`okd --help` and `okd models` with every optional extra unimportable (a wheel installed without extras):
    an extra is imported only on the path that needs it."""
    import subprocess
    import sys

    blocker = (
        "import importlib.abc, runpy, sys\n"
        "EXTRAS = {'submitit', 'matplotlib', 'onnx', 'onnxruntime', 'onnxscript', 'tensorboard', 'safetensors',\n"
        "          'timm', 'torchvision', 'PIL'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in EXTRAS:\n"
        "            raise ImportError(f'{name} is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['okd', *sys.argv[1:]]\n"
        "runpy.run_module('okd', run_name='__main__')\n"
    )
    for argv in (["--help"], ["methods"]):
        done = subprocess.run([sys.executable, "-c", blocker, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
