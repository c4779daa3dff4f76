"""`agencyllm feedback list|export`: the feedback channel, over the admin API."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from agencyllm.quotas.models import FeedbackCategory
from agencyllm.serving.cli.admin import Url, call, params
from agencyllm.serving.cli.formats import FeedbackFormat
from agencyllm.serving.cli.output import as_json, table

COLUMNS = ("id", "created_at", "tenant", "username", "rating", "category", "request_id", "comment")

app = typer.Typer(help="the feedback channel", no_args_is_help=True)


def feedback(
    tenant: Annotated[str | None, typer.Option()] = None,
    category: Annotated[FeedbackCategory | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(metavar="DATE")] = None,
    until: Annotated[str | None, typer.Option(metavar="DATE")] = None,
    limit: Annotated[int | None, typer.Option()] = None,
    url: Url = None,
    fmt: FeedbackFormat = "table",
) -> int:
    query = params(
        tenant=tenant,
        category=category.value if category else None,
        limit=limit,
        format=fmt if fmt in ("jsonl", "csv") else "json",
        **{"from": since, "to": until},
    )
    response = call(url, "GET", "/feedback", params=query)
    if fmt in ("jsonl", "csv"):
        sys.stdout.write(response.text)
    elif fmt == "json":
        as_json(response.json())
    elif rows := response.json():
        table(rows, COLUMNS)
    else:
        print("(no feedback)")
    return 0


app.command("list", help="list feedback")(feedback)
app.command("export", help="export feedback (use --format jsonl or csv)")(feedback)
