"""The mutation tool's map (tools/mutation/population.py): every core source file has test files, and they exist;
the gap finder counts only the lines a file's own test files ran."""

from pathlib import Path

from tools.mutation.gaps import unexecuted
from tools.mutation.population import CORE, TESTS, resolve_guards

ROOT = Path(__file__).resolve().parents[2]
CORE_DIRS = ("okd/data", "okd/nn", "okd/methods", "okd/engine", "okd/runs")


def test_every_core_source_file_is_mapped_to_test_files():
    on_disk = {"okd/config.py", "okd/io.py"} | {
        p.relative_to(ROOT).as_posix()
        for folder in CORE_DIRS
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py"
    }
    assert sorted(on_disk - set(TESTS)) == [], "add these to TESTS in tools/mutation/population.py"
    assert sorted(set(CORE) - on_disk) == [], "TESTS names source files that no longer exist"


def test_every_mapped_test_file_exists():
    missing = sorted({t for tests in TESTS.values() for t in tests if not (ROOT / "tests" / t).is_file()})
    assert missing == []


def test_gaps_are_the_statements_none_of_the_files_own_tests_ran():
    executed = {"a.py": {1, 2}, "b.py": {3}, "other.py": {4, 5}}
    assert unexecuted({1, 2, 3, 4, 5}, executed, ["a.py", "b.py"]) == [4, 5]  # other.py is not this file's test
    assert unexecuted({1, 2}, executed, ["missing.py"]) == [1, 2]
    assert unexecuted({1}, executed, ["a.py"]) == []


def test_every_guard_row_still_matches_its_mutants():
    """A guard that moved or changed makes its row match another number of mutants: the guards run would stop, so
    this fails first, naming the row."""
    guards = resolve_guards(ROOT / "results" / "mutation" / "guards" / "guards.tsv")
    assert len(guards) >= 80 and set(guards.values()) >= {"nothing non-finite overwrites a good file"}
