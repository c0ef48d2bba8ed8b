"""Plain-text output of the CLI: kubectl-like tables, human-readable sizes and balances, and
``-o json|yaml`` dumps of wire messages (every field, defaults included)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

OUTPUT_FORMATS = ("table", "json", "yaml")
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int | float | None) -> str:
    """``231519289344`` -> ``"215.6 GiB"``; None -> ``"unknown"`` (a size that was not given)."""
    if n is None:
        return "unknown"
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} bytes" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def moved_bytes(n: int, expert_bytes: int) -> str:
    """A migration size; ``"unknown"`` when the expert size (``expert_bytes``) is not known, as
    the count is then 0 whatever moved."""
    return human_bytes(n) if expert_bytes else "unknown (expert size not given)"


def mean(values: Sequence[float]) -> str:
    """The mean of per-layer values with 4 decimals, ``"-"`` when there are none."""
    return f"{sum(values) / len(values):.4f}" if len(values) else "-"


def worst(values: Sequence[float]) -> str:
    return f"{max(values):.4f}" if len(values) else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell, two spaces apart, never wrapped or cut (as kubectl
    prints them, whatever the terminal width)."""
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def message_dict(msg) -> dict:
    """A wire message as a dict with the proto's field names, defaults included."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def dump(obj, fmt: str, out: TextIO | None = None) -> None:
    """Write ``obj`` (a dict/list of plain values) as JSON or YAML."""
    import yaml

    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(obj, indent=2) + "\n")
    else:
        out.write(yaml.safe_dump(obj, sort_keys=False, width=120))


def add_output_argument(parser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table",
                        help="table (default), or every field as json or yaml")


PIPED_WIDTH = 1000   # columns rich may use when stdout is not a terminal (a file, a pipe, CI logs)


def console(file: TextIO | None = None):
    """A rich Console for ``file`` (default stdout): the terminal's width on a terminal;
    otherwise lines are not wrapped and tables not cut to 80 columns (rich's default)."""
    from rich.console import Console

    probe = Console(file=file)
    if probe.is_terminal:
        return probe
    return Console(file=file, width=PIPED_WIDTH, soft_wrap=True)
