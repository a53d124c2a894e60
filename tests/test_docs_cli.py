"""Every `enclavefl ...` command written in the README and docs/ exists, with those options,
in the CLI's own `--help`; and the README's command table covers every command."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from enclavefl.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def _snippets(text: str) -> list[str]:
    """Command lines in fenced blocks (`$ ` prompts allowed) and inline `enclavefl ...` code."""
    found: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            command = line.strip().removeprefix("$ ")
            if command.startswith("enclavefl "):
                found.append(command)
            continue
        found.extend(m.group(1).replace("\\|", "|") for m in re.finditer(r"`(enclavefl [^`]+)`", line))
    return found


def _resolve(words: list[str]) -> tuple[click.Command, tuple[str, ...]]:
    """The (sub)command a command line names, and its path of names."""
    command: click.Command = main
    path: list[str] = []
    for word in words:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            path.append(word)
        else:
            break
    return command, tuple(path)


@cache
def _help_options(path: tuple[str, ...]) -> frozenset[str]:
    """The long options that `enclavefl PATH --help` prints."""
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return frozenset(_OPTION.findall(result.output))


def _options_in(command_line: str) -> set[str]:
    return set(_OPTION.findall(command_line))


def _leaf_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    leaves: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            leaves.extend(_leaf_commands(command, (*prefix, name)))
        else:
            leaves.append((*prefix, name))
    return leaves


def _documented() -> list[tuple[str, str]]:
    return [(doc.name, line) for doc in DOCS for line in _snippets(doc.read_text())]


def _readme_rows() -> list[str]:
    """Synopses in the first column of the README's command table."""
    rows: list[str] = []
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith("| `enclavefl"):
            continue
        cell = re.split(r"(?<!\\)\|", line)[1]
        for code in re.findall(r"`([^`]+)`", cell):
            code = code.replace("\\|", "|")
            rows.append(code if code.startswith("enclavefl ") else f"enclavefl {code}")
    return rows


@pytest.mark.parametrize(("doc", "command_line"), _documented())
def test_documented_command_and_options_exist(doc: str, command_line: str) -> None:
    words = command_line.split()[1:]
    _, path = _resolve(words)
    if not path:
        assert words[0].isupper(), f"{doc}: `{command_line}`: {words[0]!r} is not an enclavefl command"
        return  # a placeholder such as `enclavefl COMMAND --help`
    unknown = _options_in(command_line) - _help_options(path)
    assert not unknown, f"{doc}: `{command_line}`: `enclavefl {' '.join(path)} --help` has no {sorted(unknown)}"


def test_readme_table_lists_every_command() -> None:
    listed = {_resolve(row.split()[1:])[1] for row in _readme_rows()}
    missing = [" ".join(path) for path in _leaf_commands() if path not in listed]
    assert not missing, f"README's command table has no row for: {missing}"


def test_readme_synopsis_shows_the_options_the_guides_use() -> None:
    """A synopsis that is not abbreviated (`...`) shows every option the docs use with it."""
    used: dict[tuple[str, ...], set[str]] = {}
    for _, line in _documented():
        _, path = _resolve(line.split()[1:])
        if path:
            used.setdefault(path, set()).update(_options_in(line) - {"--help"})
    shown: dict[tuple[str, ...], set[str]] = {}
    abbreviated: set[tuple[str, ...]] = set()
    for row in _readme_rows():  # a command may have several synopses (`new DIR ...` / `new --list`)
        _, path = _resolve(row.split()[1:])
        shown.setdefault(path, set()).update(_options_in(row))
        if "..." in row or "…" in row:
            abbreviated.add(path)
    problems = []
    for path, options in shown.items():
        missing = used.get(path, set()) - options
        if missing and path not in abbreviated:
            problems.append(f"`enclavefl {' '.join(path)}` lacks {sorted(missing)}")
    assert not problems, "README command table: " + "; ".join(problems)
