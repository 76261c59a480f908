"""The README and docs/ name the tests behind their promises: every test they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: ``tests/x/test_y.py::test_z``, ``tests/x/test_y.py``, and ``::test_z`` (of the file named last before it)
NAMED = re.compile(r"`(tests/[\w/]+\.py)?(?:::(test_\w+))?`|::(test_\w+)")
BARE = re.compile(r"`(test_\w+)`")


def functions_of(path: Path) -> set[str]:
    return set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_test_a_page_names_exists(page):
    text = page.read_text(encoding="utf-8")
    every = set().union(*(functions_of(p) for p in (ROOT / "tests").rglob("test_*.py")))
    missing, current = [], None
    for match in NAMED.finditer(text):
        file, name, follow = match.groups()
        if file:
            current = ROOT / file
            if not current.is_file():
                missing.append(file)
                continue
        name = name or follow
        if name and name not in (functions_of(current) if current is not None else every):
            missing.append(f"{current.relative_to(ROOT) if current is not None else ''}::{name}")
    missing += [f"`{n}`" for n in BARE.findall(text) if n not in every]
    assert not missing, f"{page.name} names tests that do not exist: {missing}"
