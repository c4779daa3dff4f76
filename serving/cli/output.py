"""Output of the admin commands: rich tables for people, JSON (and the server's CSV) for scripts.

Tables keep one row per line with the upper-cased field names as headers, so that `awk` and
`grep` on a table still work; values are printed as they are (no markup, no truncation).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _console() -> Console:
    # Piped output is not cut to a terminal's width: a script gets every value whole.
    return Console(width=None if sys.stdout.isatty() else 100_000, highlight=False)


def _print(table: Table) -> None:
    console = _console()
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("\n".join(line.rstrip() for line in captured.get().splitlines()) + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    grid = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for column in columns:
        grid.add_column(column.upper(), no_wrap=True)
    for row in rows:
        grid.add_row(*(Text(cell(row.get(c))) for c in columns))
    _print(grid)


def record(data: dict[str, Any]) -> None:
    """One record: a field per line."""
    grid = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), show_header=False)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    for name, value in data.items():
        grid.add_row(Text(name), Text(cell(value)))
    _print(grid)


def as_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def show(fmt: str, data: Any, columns: Sequence[str], empty: str = "(none)") -> None:
    if fmt == "json":
        as_json(data)
    elif not isinstance(data, list):
        record(data)
    elif data:
        table(data, columns)
    else:
        print(empty)
