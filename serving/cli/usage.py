"""`agencyllm usage`: token and request totals, per day, user, model or tenant."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from agencyllm.serving.cli.admin import Url, call, params
from agencyllm.serving.cli.formats import TableJsonOrCsv
from agencyllm.serving.cli.output import as_json, table

TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def usage(
    tenant: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(metavar="DATE", help="YYYY-MM-DD (inclusive) or ISO date-time")] = None,
    until: Annotated[
        str | None, typer.Option(metavar="DATE", help="YYYY-MM-DD (inclusive) or ISO date-time (exclusive)")
    ] = None,
    group_by: Annotated[Literal["day", "user", "model", "tenant"], typer.Option()] = "day",
    url: Url = None,
    fmt: TableJsonOrCsv = "table",
) -> int:
    """usage totals"""
    query = params(
        tenant=tenant,
        user=user,
        model=model,
        group_by=group_by,
        format="csv" if fmt == "csv" else "json",
        **{"from": since, "to": until},
    )
    response = call(url, "GET", "/usage", params=query)
    if fmt == "csv":
        sys.stdout.write(response.text)
        return 0
    report = response.json()
    if fmt == "json":
        as_json(report)
        return 0
    key_columns = [group_by, *(["username"] if group_by == "user" else [])]
    rows = report["rows"]
    if rows:
        table(rows, [*key_columns, *TOTALS])
    else:
        print("(no usage)")
    return 0
