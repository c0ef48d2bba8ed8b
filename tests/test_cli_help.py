"""Every command's --help: each option explained, its default given once (never "None"),
no docstring markup, and output helpers (sizes, tables, rich consoles) readable when piped."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from expertplane.cli.main import build_parser
from expertplane.cli.output import PIPED_WIDTH, console, human_bytes, moved_bytes, table


def _parsers(parser: argparse.ArgumentParser, name: str = "expertplane"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _parsers(child, f"{name} {child_name}")


PARSERS = dict(_parsers(build_parser()))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_clean(name):
    parser = PARSERS[name]
    text = parser.format_help()
    assert "``" not in text
    assert "(default: None)" not in text
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        shown = parser._get_formatter()._expand_help(action) if action.help else ""
        assert len(re.findall(r"\(default", shown, re.I)) <= 1, (name, shown)


def test_sizes_read_like_sizes():
    assert human_bytes(231519289344) == "215.6 GiB"
    assert human_bytes(512) == "512 bytes"
    assert human_bytes(None) == "unknown"
    assert moved_bytes(0, 0) == "unknown (expert size not given)"
    assert moved_bytes(3 << 30, 1 << 30) == "3.0 GiB"


def test_piped_output_is_not_wrapped_or_cut():
    out = io.StringIO()
    line = "x" * 300
    console(out).print(line)
    assert out.getvalue() == line + "\n"
    from rich.table import Table
    wide = Table(*[f"column {i}" for i in range(30)])
    wide.add_row(*[f"value-{i:03d}" for i in range(30)])
    out = io.StringIO()
    console(out).print(wide)
    assert "…" not in out.getvalue() and "value-029" in out.getvalue()
    assert console(out).width == PIPED_WIDTH
    plain = io.StringIO()
    table(("A", "LONG HEADER"), [(1, "x" * 200)], plain)
    assert plain.getvalue().splitlines()[1] == "1  " + "x" * 200
