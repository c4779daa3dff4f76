"""The `--format` choices of the admin commands (unchanged from the first CLI: scripts pass them)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

TableOrJson = Annotated[Literal["table", "json"], typer.Option("--format", help="table for people, json for scripts")]
TableJsonOrCsv = Annotated[Literal["table", "json", "csv"], typer.Option("--format", help="table, json or csv")]
FeedbackFormat = Annotated[
    Literal["table", "json", "jsonl", "csv"], typer.Option("--format", help="table, json, jsonl or csv")
]
