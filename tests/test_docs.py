"""The docs say what the code does: their commands, settings and module map, checked against the code.

Everything is parsed from README.md and docs/*.md as they are, never from a
list copied here, and compared with the code itself:

- every ``celery saga <command> ...`` the docs show (in a code block, in
  inline code, or as a row of a table whose first column is "command")
  names a subcommand whose ``--help`` lists each option used with it, and
  whose parser takes the words as given; an option written on its own
  (``--json``) must be an option of a command named in the prose of its
  section (or in its table row);
- every ``saga_*`` name is a setting the code reads, or a name the package
  defines (``saga_step``, a fixture, a parameter); where it is written as a
  setting (``app.conf.saga_x``, ``saga_x = ...``, a settings table) it
  must be a setting, and where a default is given (a settings table's
  "default" column, or prose such as "(16)", ", 300 s", "(0.5 by default)")
  it equals the code's;
- docs/architecture.md's module map names every ``.py`` and ``.lua`` file of
  ``celery_saga/``, and nothing that is not there.

No Redis, no worker, no subprocess: the CLI is read through click in-process.
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from celery_saga import settings as settings_module
from celery_saga.cli import saga as saga_cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "celery_saga"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- reading the docs --------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A piece of a doc: a line of a fenced code block, a prose paragraph or heading, or a table row."""

    doc: str
    line: int
    kind: str  # "block", "prose" or "row"
    text: str
    section: int  # which heading of the doc it is under
    header: tuple[str, ...] = ()  # a row's table header cells


@dataclass(frozen=True)
class Span:
    """One piece of code in the docs: an inline code span, or a line of a code block."""

    unit: Unit
    line: int
    text: str  # an inline span's whitespace collapsed to single spaces
    cell: int | None = None  # a table row's cell it is in

    @property
    def where(self) -> str:
        return f"{self.unit.doc}:{self.line}"


def cells(row: str) -> list[str]:
    """A table row's cells, split on the pipes outside inline code."""
    out: list[str] = []
    current: list[str] = []
    in_code = False
    for ch in row.strip():
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return out[1:-1] if row.strip().startswith("|") else out


def units(path: Path) -> Iterator[Unit]:
    doc = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    section, fence = 0, False
    header: tuple[str, ...] = ()
    para: list[str] = []
    para_start = 0

    def flush() -> Iterator[Unit]:
        if para:
            yield Unit(doc, para_start, "prose", "\n".join(para), section)
            para.clear()

    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            yield from flush()
            fence = not fence
            continue
        if fence:
            yield Unit(doc, number, "block", line, section)
            continue
        if line.startswith("|"):
            yield from flush()
            row = tuple(cells(line))
            if not header:
                header = row
            elif not all(set(c) <= set("-: ") for c in row):
                yield Unit(doc, number, "row", line, section, header)
            continue
        header = ()
        if line.startswith("#"):
            yield from flush()
            section += 1
            yield Unit(doc, number, "prose", line, section)
        elif not line.strip():
            yield from flush()
        else:
            if not para:
                para_start = number
            para.append(line)
    yield from flush()


def spans(unit: Unit) -> Iterator[Span]:
    if unit.kind == "block":
        yield Span(unit, unit.line, unit.text)
        return
    parts = cells(unit.text) if unit.kind == "row" else [unit.text]
    for i, part in enumerate(parts):
        for m in re.finditer(r"`([^`]+)`", part):
            line = unit.line + unit.text.count("\n", 0, unit.text.find(part) + m.start())
            yield Span(unit, line, " ".join(m[1].split()), i if unit.kind == "row" else None)


@functools.cache
def all_units() -> tuple[Unit, ...]:
    return tuple(u for path in DOCS for u in units(path))


@functools.cache
def all_spans() -> tuple[Span, ...]:
    return tuple(s for u in all_units() for s in spans(u))


def first_cell_is(span: Span, title: str) -> bool:
    return span.cell == 0 and bool(span.unit.header) and span.unit.header[0].lower() == title


# -- 1. celery saga commands --------------------------------------------------------

# In inline code the whole span is the command ("celery -A proj saga list --json", "saga show");
# in a code block, a command may sit anywhere on a line, up to a comment, a backtick or a bracket.
SPAN_COMMAND = re.compile(r"^(?:(?:python -m )?celery (?:-A \S+ )?)?saga (?P<sub>\S+)(?P<args>.*)$")
LINE_COMMAND = re.compile(r"\bcelery\s+(?:-A\s+\S+\s+)?saga\s+(?P<sub>[^\s`#;|)]+)(?P<args>[^`#;|)]*)")


@dataclass(frozen=True)
class Command:
    span: Span
    sub: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.span.where}: `celery saga {' '.join((self.sub, *self.words))}`"


def words(args: str) -> tuple[str, ...]:
    """The words of a command as documented, without its usage brackets and ellipses."""
    text = re.sub(r"[\[\]]|\.\.\.|…", " ", args)
    try:
        return tuple(shlex.split(text))
    except ValueError:
        return tuple(text.split())


def commands() -> list[Command]:
    found = []
    for span in all_spans():
        text = span.text
        if first_cell_is(span, "command"):
            text = f"saga {text}"  # a row of the CLI's command table
        matches = LINE_COMMAND.finditer(text) if span.unit.kind == "block" else filter(None, [SPAN_COMMAND.match(text)])
        for m in matches:
            # "celery saga ..." stands for every command, not one.
            if re.fullmatch(r"[a-z][\w-]*", m["sub"]):
                found.append(Command(span, m["sub"], words(m["args"])))
    return found


def section_commands() -> dict[tuple[str, int], set[str]]:
    """The saga commands named in each section's prose (not in its tables or code blocks)."""
    named: dict[tuple[str, int], set[str]] = {}
    for c in commands():
        if c.span.unit.kind == "prose":
            named.setdefault((c.span.unit.doc, c.span.unit.section), set()).add(c.sub)
    return named


def options_of(command: click.Command) -> set[str]:
    return {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}


def parse_problem(command: click.Command, c: Command) -> str | None:
    """What click says about the words, or None when it takes them (values are not checked: they are placeholders)."""
    ctx = click.Context(command, info_name=c.sub)
    try:
        _, extra, _ = command.make_parser(ctx).parse_args(list(c.words))
    except click.UsageError as exc:
        return exc.format_message()
    return f"got unexpected extra argument(s) {extra}" if extra else None


def test_every_saga_command_in_the_docs_parses() -> None:
    documented = commands()
    subs = {c.sub for c in documented}
    # The parser still sees the docs: they name most of the commands.
    assert len(subs) >= 5, f"only {sorted(subs)} found: has the docs' format changed?"
    runner = CliRunner()
    helps: dict[str, str] = {}
    problems = []
    for sub in sorted(subs):
        if sub not in saga_cli.commands:
            problems += [
                f"{c}: no such command (`celery saga` has {sorted(saga_cli.commands)})"
                for c in documented
                if c.sub == sub
            ]
            continue
        shown = runner.invoke(saga_cli, [sub, "--help"])
        assert shown.exit_code == 0, shown.output
        helps[sub] = shown.output
    for c in documented:
        if c.sub not in helps:
            continue
        command = saga_cli.commands[c.sub]
        for word in c.words:
            option = word.split("=", 1)[0]
            if option.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[c.sub]):
                problems.append(f"{c}: `celery saga {c.sub} --help` lists no {option}")
        problem = parse_problem(command, c)
        if problem:
            problems.append(f"{c}: {problem}")
    assert not problems, "\n".join(problems)


def test_every_option_written_alone_is_an_option_of_its_sections_commands() -> None:
    named = section_commands()
    documented = commands()
    checked, problems = 0, []
    for span in all_spans():
        if span.unit.kind == "block" or not span.text.startswith("--"):
            continue
        subs = set(named.get((span.unit.doc, span.unit.section), set()))
        if span.unit.kind == "row":
            subs |= {c.sub for c in documented if c.span.unit == span.unit}
        subs &= set(saga_cli.commands)
        if not subs:
            continue  # a section about something else (a benchmark's or pytest's options)
        known = set().union(*(options_of(saga_cli.commands[s]) for s in subs))
        for word in words(span.text):
            if word.startswith("--"):
                checked += 1
                if word.split("=", 1)[0] not in known:
                    problems.append(f"{span.where}: `{span.text}`: {word} is an option of none of {sorted(subs)}")
    assert checked >= 3, "no option written alone was checked: has the docs' format changed?"
    assert not problems, "\n".join(problems)


# -- 2. settings ----------------------------------------------------------------------

SETTING = r"saga_[a-z0-9_]*[a-z0-9]"


def python_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def settings_read() -> dict[str, str]:
    """Every setting the package reads from ``app.conf``, with one expression that reads it."""
    read = {name: "SETTING_NAMES" for name in settings_module.SETTING_NAMES}
    for path in python_sources():
        text = path.read_text()
        # conf.get("saga_x") ... to the end of its line (how it is read), or conf.saga_x.
        for m in re.finditer(rf"conf(?:\.get\(|\[)[\"']({SETTING})[\"'][)\]][^\n]*|conf\.({SETTING})", text):
            if m[1]:
                read[m[1]] = m[0]
            else:
                read.setdefault(m[2], m[0])
    return read


def code_default(name: str, read: str) -> Any:
    """The value the code uses when ``name`` is not set."""
    if name in settings_module._DEFAULTS:
        return settings_module._DEFAULTS[name]
    if re.search(r"\)\s*is (not )?False", read):
        return True  # read as "anything but False": unset is on
    if re.search(r"\)\s*or \(\)", read):
        return ()
    return None


def package_names() -> set[str]:
    """Every ``saga_*`` name the package defines: functions, fixtures, parameters, variables, string keys."""
    names: set[str] = set()
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return {n for n in names if re.fullmatch(SETTING, n)}


UNITS = {"s": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60}
UNITS |= {"h": 3600, "hour": 3600, "hours": 3600, "day": 86400, "days": 86400}
NUMBER = r"(?P<num>\d[\d,]*(?:\.\d+)?)(?:\s+(?P<unit>s|seconds?|min|minutes?|h|hours?|days?))?"
# Defaults in prose: "`saga_index_shards` (16)", "`saga_retention` (1 day)",
# "`saga_default_step_timeout`, 300 s.", "(`saga_x`, 600 s by default",
# "every `saga_sweep_interval` seconds (0.5 by default)".
PROSE_DEFAULTS = [
    re.compile(rf"`(?P<name>{SETTING})`\s+\({NUMBER}\)"),
    re.compile(rf"`(?P<name>{SETTING})`,\s+{NUMBER}(?=\s+by\s+default|[.,;)])"),
    re.compile(rf"`(?P<name>{SETTING})`\s+seconds\s+\({NUMBER}\s+by\s+default\)"),
]


@dataclass(frozen=True)
class Default:
    where: str
    name: str
    text: str
    value: Any


def documented_defaults() -> Iterator[Default]:
    for unit in all_units():
        if unit.kind == "row" and [h.lower() for h in unit.header[:2]] == ["setting", "default"]:
            row = cells(unit.text)
            names = re.findall(r"`([^`]+)`", row[0])
            names = [names[0] + n if n.startswith("_") else n for n in names]
            given = re.match(r"^`([^`]+)`(?:,\s*`([^`]+)`)*", row[1])
            if given is None:
                continue  # no literal default ("the broker URL ...")
            values = re.findall(r"`([^`]+)`", given[0])
            for name, value in zip(names, values, strict=False):
                yield Default(f"{unit.doc}:{unit.line}", name, value, ast.literal_eval(value))
        elif unit.kind == "prose":
            text = " ".join(unit.text.split())
            for pattern in PROSE_DEFAULTS:
                for m in pattern.finditer(text):
                    number = float(m["num"].replace(",", "")) * UNITS.get(m["unit"] or "s", 1)
                    yield Default(f"{unit.doc}:{unit.line}", m["name"], m[0], number)
    # The settings table in settings.py's own docstring is a doc too.
    doc = settings_module.__doc__ or ""
    for m in re.finditer(rf"^({SETTING})\s+(\S+)", doc, re.M):
        value = m[2].strip("`")
        try:
            yield Default("celery_saga/settings.py (docstring)", m[1], m[2], ast.literal_eval(value))
        except (ValueError, SyntaxError):
            continue  # "broker URL": no literal


def same(documented: Any, code: Any) -> bool:
    numbers = (int, float)
    if isinstance(documented, numbers) and not isinstance(documented, bool):
        return isinstance(code, numbers) and not isinstance(code, bool) and float(documented) == float(code)
    if isinstance(documented, (list, tuple)) and isinstance(code, (list, tuple)):
        return list(documented) == list(code)
    return bool(documented == code) and type(documented) is type(code)


def setting_mentions() -> Iterator[tuple[Span, str, bool]]:
    """Each ``saga_*`` name in the docs' code, and whether it is written as a setting."""
    for span in all_spans():
        for m in re.finditer(rf"(?<![\w.<-])({SETTING})|conf\.({SETTING})", span.text):
            name, end = (m[1], m.end(1)) if m[1] else (m[2], m.end(2))
            as_setting = bool(m[2]) or first_cell_is(span, "setting")
            # "`saga_sweeper = False`" in prose sets it; in a code block it may be a variable.
            as_setting |= span.unit.kind != "block" and bool(re.match(r"\s*=[^=]", span.text[end:]))
            yield span, name, as_setting


def test_every_setting_the_docs_name_exists_with_the_codes_default() -> None:
    read = settings_read()
    defined = package_names()
    problems = []
    # Where the package lists its settings (settings.py's docstring) it lists what it reads.
    table = set(re.findall(rf"^({SETTING})\s", settings_module.__doc__ or "", re.M))
    problems += [
        f"celery_saga/settings.py's table lacks {name}, which the code reads" for name in sorted(set(read) - table)
    ]
    problems += [
        f"celery_saga/settings.py's table has {name}, which no code reads" for name in sorted(table - set(read))
    ]
    settings_named = 0
    for span, name, as_setting in setting_mentions():
        if name in read:
            settings_named += 1
        elif as_setting:
            near = difflib.get_close_matches(name, read, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"{span.where}: `{span.text}`: {name} is no setting the code reads{hint}")
        elif name not in defined:
            problems.append(f"{span.where}: `{span.text}`: {name} is neither a setting nor a name in celery_saga")
    defaults = list(documented_defaults())
    for d in defaults:
        if d.name not in read:
            problems.append(f"{d.where}: {d.text!r} gives a default for {d.name}, which is no setting")
            continue
        code = code_default(d.name, read[d.name])
        if not same(d.value, code):
            problems.append(
                f"{d.where}: {d.text!r} says {d.name} defaults to {d.value!r}; the code's default is {code!r}"
            )
    # The parser still sees the docs: the README's settings table, and defaults in prose.
    assert settings_named >= 20, f"only {settings_named} settings found in the docs: has their format changed?"
    assert sum(d.where.startswith("README.md") for d in defaults) >= 10, defaults
    assert any(d.where.startswith("docs/") for d in defaults), defaults
    assert not problems, "\n".join(problems)


# -- 3. the module map -----------------------------------------------------------------


def test_the_module_map_names_every_module_and_only_those() -> None:
    mapped: dict[str, str] = {}
    for unit in all_units():
        if unit.doc == "docs/architecture.md" and unit.kind == "row" and unit.header[:1] == ("module",):
            for path in re.findall(r"`([^`]+)`", cells(unit.text)[0]):
                mapped[path] = f"{unit.doc}:{unit.line}"
    modules = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*")
        if p.suffix in (".py", ".lua") and "__pycache__" not in p.parts
    }
    assert len(mapped) >= 20, f"the module map of docs/architecture.md was not found: {mapped}"
    problems = [f"docs/architecture.md's module map lacks celery_saga/{m}" for m in sorted(modules - set(mapped))]
    problems += [
        f"{where}: the module map names celery_saga/{path}, which does not exist"
        for path, where in sorted(mapped.items())
        if not (PACKAGE / path).exists()
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("row", "expected"),
    [("| `a|b` | c |", ["`a|b`", "c"]), ("|---|---|", ["---", "---"]), ("| x |", ["x"])],
)
def test_cells_split_on_pipes_outside_code(row: str, expected: list[str]) -> None:
    assert cells(row) == expected


def test_every_test_the_docs_name_as_evidence_exists() -> None:
    # "Test: tests/x.py::test_name" lines (docs/guarantees.md, docs/upgrades.md ...) back a rule with a test.
    named = [
        (doc.name, path, name)
        for doc in sorted((ROOT / "docs").glob("*.md"))
        for path, name in re.findall(r"Test: (tests/[\w/]+\.py)::(\w+)", doc.read_text())
    ]
    assert len(named) > 20
    missing = [
        f"{doc}: {path}::{name}"
        for doc, path, name in named
        if not (ROOT / path).exists() or not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert missing == []
