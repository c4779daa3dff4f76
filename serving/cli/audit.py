"""`agencyllm audit verify|export`: the tamper-evident audit trail.

`audit` talks to the database directly and finds it like every other command:
`AGENCYLLM_DATABASE_URL`, else the embedded server under `--data-dir`. Run it as a user in the
`agencyllm_audit_reader` role (docs/compliance/audit.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from agencyllm.serving.cli.common import CommandError, DataDir, settings

SYSLOG_FACILITIES = (
    "auth",
    "authpriv",
    "daemon",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
    "user",
)
SyslogFacility = Literal[SYSLOG_FACILITIES]  # type: ignore[valid-type]

app = typer.Typer(help="verify and export the tamper-evident audit trail", no_args_is_help=True)


def with_database(data_dir: Path | None, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run `work(conn)` on one asyncpg connection to the platform's database."""
    import asyncpg

    from agencyllm.quotas.db import asyncpg_connect_args
    from agencyllm.serving.ops.local_db import database_url

    url, postgres = database_url(settings(data_dir=data_dir))

    async def run() -> int:
        conn = await asyncpg.connect(**asyncpg_connect_args(url))
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise CommandError(f"database: {exc}") from None
    finally:
        if postgres is not None:
            postgres.stop()


@app.command("verify", help="walk the hash chain; exit 1 naming the first bad record")
def verify(data_dir: DataDir = None, fmt: Annotated[Literal["text", "json"], typer.Option("--format")] = "text") -> int:
    from agencyllm.quotas.audit import verify_chain

    async def work(conn: Any) -> int:
        result = await verify_chain(conn)
        if fmt == "json":
            fields = ("ok", "records", "first_seq", "last_seq", "head_hash", "bad_seq", "problem")
            print(json.dumps({name: getattr(result, name) for name in fields}))
        else:
            print(result.summary())
        return 0 if result.ok else 1

    return with_database(data_dir, work)


def syslog_handler(target: str, facility: str) -> logging.Handler:
    """`/dev/log` (a local socket path) or `host:port` (UDP; `tcp://host:port` for TCP)."""
    code = logging.handlers.SysLogHandler.facility_names[facility]
    if target.startswith("/"):
        return logging.handlers.SysLogHandler(address=target, facility=code)
    kind = socket.SOCK_DGRAM
    if target.startswith("tcp://"):
        kind, target = socket.SOCK_STREAM, target.removeprefix("tcp://")
    target = target.removeprefix("udp://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"syslog target must be /path/to/socket or host:port, not {target!r}")
    return logging.handlers.SysLogHandler(address=(host, int(port)), facility=code, socktype=kind)


@app.command("export", help="audit records as JSON lines (for a SIEM)")
def export(
    since: Annotated[
        str,
        typer.Option(
            metavar="WHEN",
            help="YYYY-MM-DD, ISO date-time (UTC unless given), or 30m/24h/7d back from now",
            show_default=False,
        ),
    ],
    data_dir: DataDir = None,
    until: Annotated[str | None, typer.Option(metavar="WHEN", help="exclusive end (default: now)")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's records")] = None,
    fmt: Annotated[Literal["jsonl"], typer.Option("--format")] = "jsonl",
    output: Annotated[
        str | None, typer.Option("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    ] = None,
    syslog: Annotated[
        str | None,
        typer.Option(
            metavar="TARGET", help="also send each line to syslog: /dev/log, host:port (UDP) or tcp://host:port"
        ),
    ] = None,
    syslog_facility: Annotated[SyslogFacility, typer.Option()] = "authpriv",
) -> int:
    from agencyllm.quotas.audit import export_records, parse_since

    now = datetime.now(UTC)
    try:
        start = parse_since(since, now)
        end = parse_since(until, now) if until else now
    except ValueError:
        raise CommandError("--since/--until take YYYY-MM-DD, an ISO date-time, or 30m/24h/7d", code=2) from None
    logger = None
    if syslog:
        try:
            handler = syslog_handler(syslog, syslog_facility)
        except (OSError, ValueError) as exc:
            raise CommandError(f"syslog: {exc}", code=2) from None
        handler.setFormatter(logging.Formatter("agencyllm-audit: %(message)s"))
        logger = logging.Logger("agencyllm.audit.export")
        logger.addHandler(handler)
    out = open(output, "w", encoding="utf-8") if output else (None if logger else sys.stdout)

    async def work(conn: Any) -> int:
        count = 0
        async for record in export_records(conn, start, end, tenant):
            line = json.dumps(record, separators=(",", ":"), sort_keys=True)
            if out is not None:
                out.write(line + "\n")
            if logger is not None:
                logger.info(line)
            count += 1
        print(f"exported {count} audit records from {start.isoformat()} to {end.isoformat()}", file=sys.stderr)
        return 0

    try:
        return with_database(data_dir, work)
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
        if logger is not None:
            for handler in logger.handlers:
                handler.close()
