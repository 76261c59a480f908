"""The reference of every config key and method parameter (``okd config --explain``, docs/config-reference.md).

Everything here is read from the code, so the reference cannot drift from it: the keys, their types and defaults
from the dataclasses (:class:`~okd.config.RunConfig`'s sections, each method's ``Params``); their descriptions
from the comments beside or above each field in the source; the accepted values by asking the validator itself
(:func:`okd.config.validate_run`, ``Params.validate``) about a few probe values with every other key at its
default; what a resume may change from :mod:`okd.runs.resume_policy`; what a recipe may not set from
:data:`okd.config.EXECUTION_KEYS`. ``okd config --explain --markdown`` prints the docs page, and a test fails
when the committed page differs from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any

from okd.config import EXECUTION_KEYS, RunConfig, validate_run
from okd.errors import ConfigError, OKDError
from okd.methods import METHODS
from okd.runs.resume_policy import APPLIED, MAY_CHANGE

SECTIONS = ("data", "model", "optim", "train")
TOP_LEVEL = ("name", "output_dir", "seed", "recipe")
#: integers and floats the validator is asked about (the other keys at their defaults)
INT_PROBES = (-1_000_000, *range(-8, 9), 1_000_000)
FLOAT_PROBES = (-1.0, 0.0, 1e-3, 0.5, 1.0, 1.5, 1e6)
_NOT_A_CHOICE = "not-a-choice"
_CHOICES_IN_MESSAGE = re.compile(r"choose one of: ([\w\-, ]+)")


@dataclass(frozen=True)
class KeyInfo:
    """One config key as the reference describes it."""

    key: str  # dotted: train.epochs, method.temperature
    type: str
    default: Any
    doc: str  # the source comments of the field
    accepts: str  # the accepted values found by probing the validator ("" when it says nothing)
    resume: str  # may change | applied to the restored state | refused
    execution: bool  # says where a run executes: no recipe may set it
    method: str | None = None  # the method whose Params hold it


def field_comments(cls: type) -> dict[str, str]:
    """``{field: its comments}`` of a dataclass: ``#`` / ``#:`` lines right above the field and the comment at the
    end of its line, in that order; fields inherited from a base class keep the base class's comments."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found.update(_comments_of_source(source, set(klass.__dict__.get("__annotations__", {}))))
    return found


def _comments_of_source(source: str, names: set[str]) -> dict[str, str]:
    lines = source.splitlines()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    trailing = {
        t.start[0]: t.string
        for t in tokens
        if t.type == tokenize.COMMENT and lines[t.start[0] - 1].split("#")[0].strip()
    }
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = re.match(r"\s{4}(\w+)\s*:", line)
        if not match or match.group(1) not in names or line.startswith(" " * 5):
            continue
        above: list[str] = []
        k = number - 2
        while k >= 0 and lines[k].strip().startswith("#"):
            above.insert(0, lines[k].strip())
            k -= 1
        parts = [_comment_text(c) for c in [*above, trailing.get(number, "")] if c]
        out[match.group(1)] = " ".join(p for p in parts if p)
    return out


def _comment_text(comment: str) -> str:
    return re.sub(r"^#:?\s?", "", comment.strip()).strip()


def _resume(key: str) -> str:
    if key in MAY_CHANGE:
        return "may change"
    if key in APPLIED:
        return "applied to the restored state"
    return "refused"


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def show(value: Any) -> str:
    """A value as it is written in YAML or an override: null, true, 0.1, [150, 225], {}."""
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)


# ------------------------------------------------------------------------------------------------ probing
def _refusal(check, key: str, value: Any) -> str | None:
    """The validator's message when ``value`` is refused for ``key`` (a message that names the key), else None."""
    try:
        check(value)
    except (OKDError, ValueError, TypeError) as exc:
        text = str(exc)
        return text if key.rsplit(".", 1)[-1] in text else None
    return None


def _num(value: float) -> str:
    return f"{value:g}"


def _numeric_range(check, key: str, kind: str) -> str:
    """The accepted numbers as a range, read off the probes (assumed contiguous, as every check in okd is). Integer
    bounds within -7..7 are exact (every integer there is a probe); others are described as such."""
    probes = INT_PROBES if kind == "int" else FLOAT_PROBES
    refusals = {v: _refusal(check, key, v) for v in probes}
    accepted = [v for v in probes if refusals[v] is None]
    if len(accepted) == len(probes):
        return ""
    if not accepted or accepted[0] == probes[-1]:  # only a huge value passes: a check against another key
        refused = [m for m in refusals.values() if m]
        return f"checked against other keys: {refused[-1]}"
    low, high = accepted[0], accepted[-1]
    has_low, has_high = low != probes[0], high != probes[-1]
    if kind == "int":
        low_text = str(low) if low > probes[1] else f"(a bound at or below {low})"
        high_text = str(high) if high < probes[-2] else f"(a bound at or above {high})"
        if has_low and has_high:
            return f"{low_text}..{high_text}"
        return f">= {low_text}" if has_low else f"<= {high_text}"
    open_low = low == 1e-3  # 0 refused, a small positive number accepted
    low_text = "0" if open_low else _num(low)
    open_high = high == 0.5  # 1 refused, 0.5 accepted
    high_text = "1" if open_high else _num(high)
    if has_low and has_high:
        return f"{'(' if open_low else '['}{low_text}, {high_text}{')' if open_high else ']'}"
    if has_low:
        return f"{'>' if open_low else '>='} {low_text}"
    return f"{'<' if open_high else '<='} {high_text}"


def accepted_values(check, key: str, annotation: str, default: Any) -> str:
    """What the validator accepts for ``key``: its choices (from the message refusing a made-up word) or the range
    of numbers it accepts among the probes; "" when it refuses none of them."""
    kinds = {t.strip() for t in annotation.split("|")}
    if "bool" in kinds:
        return ""
    if "str" in kinds and (default is None or isinstance(default, str)):
        message = _refusal(check, key, _NOT_A_CHOICE)
        match = _CHOICES_IN_MESSAGE.search(message or "")
        return f"one of {match.group(1).strip().rstrip(',')}" if match else ""
    if "int" in kinds and "float" not in kinds:
        return _numeric_range(check, key, "int")
    if "float" in kinds:
        return _numeric_range(check, key, "float")
    return ""


def _run_check(section: str | None, name: str):
    def check(value: Any) -> None:
        run = RunConfig()
        target = run if section is None else getattr(run, section)
        setattr(target, name, value)
        validate_run(run)

    return check


def _params_check(params_cls: type, name: str):
    def check(value: Any) -> None:
        params = params_cls()
        setattr(params, name, value)
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()

    return check


# ------------------------------------------------------------------------------------------------- the keys
def run_keys() -> list[KeyInfo]:
    """Every key of the run sections and the top level, in schema order."""
    out: list[KeyInfo] = []
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    comments = field_comments(RunConfig)
    for name in TOP_LEVEL:
        f = top[name]
        out.append(_info(name, f, comments.get(name, ""), _run_check(None, name)))
    for section in SECTIONS:
        cls = type(_default(top[section]))
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            out.append(_info(key, f, comments.get(f.name, ""), _run_check(section, f.name)))
    return out


def method_keys(method: str) -> list[KeyInfo]:
    """``method.name`` and every parameter of ``method``'s ``Params``."""
    cls = METHODS.get(method).Params
    comments = field_comments(cls)
    base_error = _default_error(cls)
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cls):
        key = f"method.{f.name}"
        check = _params_check(cls, f.name)
        info = _info(key, f, comments.get(f.name, ""), check if base_error is None else None, method)
        if base_error is not None and f.name in base_error and "required" in base_error:
            info = dataclasses.replace(info, accepts="required")
        out.append(info)
    return out


def _default_error(cls: type) -> str | None:
    """The message of ``cls()``'s own validation (a Params whose defaults are incomplete, e.g. KD's teacher)."""
    try:
        params = cls()
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
    except (OKDError, ValueError, TypeError) as exc:
        return str(exc)
    return None


def _info(key: str, f: dataclasses.Field, doc: str, check, method: str | None = None) -> KeyInfo:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    default = _default(f)
    accepts = accepted_values(check, key, annotation, default) if check is not None else ""
    return KeyInfo(key, annotation, default, doc, accepts, _resume(key), key in EXECUTION_KEYS, method)


@functools.cache
def all_keys() -> tuple[list[KeyInfo], dict[str, list[KeyInfo]]]:
    """The run keys and, per registered method, its parameters (computed once per process)."""
    return run_keys(), {m: method_keys(m) for m in METHODS.names()}


# ---------------------------------------------------------------------------------------------- rendering
def _lines(info: KeyInfo) -> list[str]:
    head = f"{info.key}: {info.type} = {show(info.default)}"
    out = [head]
    if info.accepts:
        out.append(f"    accepts: {info.accepts}")
    resume = info.resume + (" (not below the epochs trained)" if info.key == "train.epochs" else "")
    out.append(f"    on resume: {resume}" + ("; no recipe may set it (where a run executes)" if info.execution else ""))
    if info.doc:
        out += textwrap.wrap(info.doc, 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    return out


def explain(what: str | None = None) -> str:
    """The plain-text reference: everything, one section (``train``), one key (``train.epochs``), one method
    (``ffsd``: its parameters) or one method parameter (``method.temperature``: in every method that has it,
    or ``ffsd.temperature`` for one). An unknown name is refused with the close names."""
    run, methods = all_keys()
    header = (
        "accepts: the values the validator accepts, found by asking it (other keys at their defaults); "
        "on resume: what `okd train --resume RUN key=value` does with the key (okd/runs/resume_policy.py)\n"
    )
    if what is None or what == "":
        blocks = [
            header,
            *("\n".join(_lines(i)) for i in run),
            f"method.name: str = baseline\n    one of {', '.join(METHODS.names())}",
        ]
        for name, keys in methods.items():
            blocks.append(f"\n# method {name}: {METHODS.info(name)['description']}")
            blocks += ["\n".join(_lines(i)) for i in keys]
        return "\n".join(blocks) + "\n"
    if what in SECTIONS:
        return "\n".join(["\n".join(_lines(i)) for i in run if i.key.startswith(f"{what}.")]) + "\n"
    if what == "method" or what == "method.name":
        listing = "\n".join(f"  {n:<12} {METHODS.info(n)['description']}" for n in METHODS.names())
        return f"method.name: str = baseline\n    the method; its parameters: okd config --explain METHOD\n{listing}\n"
    if what in methods:
        info = METHODS.info(what)
        lines = [f"# method {what}: {info['description']} [{info['paper']}]"]
        lines += ["\n".join(_lines(i)) for i in methods[what]] or ["(no parameters)"]
        return "\n".join(lines) + "\n"
    found = [i for i in run if i.key == what]
    if found:
        return "\n".join(_lines(found[0])) + "\n"
    param = what.removeprefix("method.")
    owner, _, rest = param.partition(".")
    if rest and owner in methods:
        hits = [(owner, i) for i in methods[owner] if i.key == f"method.{rest}"]
    else:
        hits = [(m, i) for m, keys in methods.items() for i in keys if i.key == f"method.{param}"]
    if hits:
        return "\n".join(f"# {m}\n" + "\n".join(_lines(i)) for m, i in hits) + "\n"
    names = [i.key for i in run] + list(SECTIONS) + list(methods)
    names += sorted({i.key for keys in methods.values() for i in keys})
    close = difflib.get_close_matches(what, names, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(
        f"okd config --explain: {what!r} is no config key, section or method{hint}; give a key (train.epochs), a "
        f"section ({', '.join(SECTIONS)}), a method ({', '.join(methods)}) or a method parameter (method.temperature)"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(info: KeyInfo) -> str:
    resume = info.resume + (" (not below the epochs trained)" if info.key == "train.epochs" else "")
    if info.execution:
        resume += "; never set by a recipe"
    cells = [f"`{info.key}`", f"`{info.type}`", f"`{show(info.default)}`", info.accepts, resume, info.doc]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown() -> str:
    """docs/config-reference.md."""
    run, methods = all_keys()
    head = "| key | type | default | accepts | on resume | description |\n|---|---|---|---|---|---|"
    out = [
        "# Config reference",
        "",
        "Generated by `okd config --explain --markdown > docs/config-reference.md` from the code itself: keys,",
        "types and defaults from the dataclasses (`okd/config.py`, each method's `Params`), descriptions from their",
        "source comments, *accepts* by asking the validator about a few probe values with every other key at its",
        "default, *on resume* from `okd/runs/resume_policy.py` ([run-folder.md](run-folder.md)), and *never set by a",
        "recipe* from `okd.config.EXECUTION_KEYS` ([recipes.md](recipes.md)). A test fails when this page is stale.",
        "`okd config --explain KEY`, `--explain SECTION` and `--explain METHOD` print the same in the terminal.",
        "",
        "## Run keys",
        "",
        "Top level (`name`, `output_dir`, `seed`, `recipe`) and the sections `data`, `model`, `optim`, `train`.",
        "",
        head,
        *(_row(i) for i in run),
        "",
        "## Methods",
        "",
        f"`method.name` picks the method: {', '.join(f'`{n}`' for n in METHODS.names())}. Every `method.*` "
        "parameter is refused on resume. Each method's parameters:",
        "",
    ]
    for name, keys in methods.items():
        info = METHODS.info(name)
        out += [f"### {name}", "", f"{info['description']}. {info['paper']}.", ""]
        incomplete = _default_error(METHODS.get(name).Params)
        if incomplete:
            out += [f"Its defaults alone are refused ({_cell(incomplete)}), so its values were not probed.", ""]
        out += [head, *(_row(i) for i in keys), ""] if keys else ["No parameters.", ""]
    return "\n".join(out).rstrip("\n") + "\n"
