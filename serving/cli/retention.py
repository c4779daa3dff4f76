"""`agencyllm retention run`: purge what outlived its retention (content, ledger, audit), audited."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from agencyllm.serving.cli.common import CommandError, DataDir, settings

app = typer.Typer(help="data retention", no_args_is_help=True)


@app.command("run", help="purge expired content, ledger and audit records (audited)")
def run(
    data_dir: DataDir = None,
    audit_days: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="keep audit records N days (default $AGENCYLLM_AUDIT_RETENTION_DAYS or 365; at least 90)"
        ),
    ] = None,
    ledger_days: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="keep usage-ledger rows N days (default $AGENCYLLM_LEDGER_RETENTION_DAYS: for ever)"
        ),
    ] = None,
) -> int:
    from agencyllm.quotas.compliance.retention import Retention
    from agencyllm.quotas.db import Database
    from agencyllm.serving.ops.local_db import database_url

    config = settings(data_dir=data_dir)
    try:
        days = {
            "audit_days": audit_days or config.audit_retention_days,
            "ledger_days": ledger_days or config.ledger_retention_days,
        }
        url, postgres = database_url(config)
    except ValueError as exc:
        raise CommandError(str(exc), code=2) from None

    async def purge() -> int:
        database = Database(url, pool_size=1)
        try:
            report = await Retention(database, **days).run()
        finally:
            await database.dispose()
        print(report.summary())
        return 0

    try:
        return asyncio.run(purge())
    except ValueError as exc:
        raise CommandError(str(exc), code=2) from None
    finally:
        if postgres is not None:
            postgres.stop()
