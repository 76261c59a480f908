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

Docstrings, f-strings, annotations, string constants and ``__all__`` are never mutated; a class body's statements
(dataclass fields, methods) are never deleted, though the values in them are. A mutant whose AST equals the
original, or that does not compile, is dropped.

Every source file maps to the test files that cover it (:data:`TESTS`, fast files first). For each mutant the
tool writes the mutated file into a private copy of the repository and runs ``pytest -x -q`` on those test files
only, with a timeout (a multiple of the unmutated run's time): **killed** (a test failed), **timeout** (counted as
killed) or **survived**. The unmutated runs must pass first. The sample is drawn with a seed, by operator (the
``--mix`` weights), evenly over the files.

Usage (from the repository root; see docs/development.md)::

    python -m tools.mutation list okd/runs/store.py                 # every mutant of a file, no run
    python -m tools.mutation run --files core --total 120 --seed 7 --out results/mutation/my-run
    python -m tools.mutation run --files okd/runs/store.py --operators delete,early_return --out /tmp/m
    python -m tools.mutation run --guards results/mutation/guards/guards.tsv --out results/mutation/guards
    python -m tools.mutation show okd/runs/store.py:245:16:delete:0   # the diff of one mutant
    python -m tools.mutation report results/mutation/my-run         # summary.md again (after triage edits)

``run`` writes ``OUT/mutants.csv`` (id, file, line, operator, change, status, seconds, tests), ``OUT/summary.md``
(counts per operator and file, kill rates, the mix, hardware, versions, the command) and ``OUT/survivors.md``.
Triage goes in ``OUT/triage.csv`` (id, verdict, reason; verdict ``equivalent`` leaves a mutant out of the
non-equivalent kill rate; ``fixed`` names the test added since); ``report`` recomputes the summary with it.

The package, one job a module: :mod:`.operators` (the mutants of a file), :mod:`.population` (the test files of
each source file, the mix, the seeded sample, ids and guards files), :mod:`.sandbox` (the private copy and its
``pytest``), :mod:`.runner` (``run``), :mod:`.report` (``summary.md``/``survivors.md``), ``__main__`` (the CLI).
"""

from pathlib import Path

#: the repository root (``tools/mutation/`` sits two levels below it)
ROOT = Path(__file__).resolve().parent.parent.parent
