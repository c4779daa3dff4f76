"""Helpers for the audit, retention and governance tests: a throw-away database at head (tests
that tamper with the chain must not break it for everyone), connections as the platform's
database roles, and the rows of the audit trail."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg

from agencyllm.quotas.db import asyncpg_connect_args, upgrade_schema


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def _with_user(url: str, user: str) -> str:
    scheme, _, rest = url.partition("://")
    _, _, host_part = rest.rpartition("@")
    return f"{scheme}://{user}@{host_part}"


@contextlib.asynccontextmanager
async def fresh_database(pg_url: str) -> AsyncIterator[str]:
    """A new database on the session's server, migrated to head; dropped afterwards."""
    name = f"audit_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(**asyncpg_connect_args(pg_url))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        url = _with_database(pg_url, name)
        upgrade_schema(url)
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@contextlib.asynccontextmanager
async def as_role(pg_url: str, role: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection as a fresh login user that is a member of `role` only (as production maps
    its database users onto agencyllm_app and agencyllm_audit_reader), and that user's URL."""
    user = f"u_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(**asyncpg_connect_args(pg_url))
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN IN ROLE {role}")
        url = _with_user(pg_url, user)
        conn = await asyncpg.connect(**asyncpg_connect_args(url))
        try:
            yield conn, url
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP OWNED BY {user}")
        await admin.execute(f"DROP ROLE {user}")
        await admin.close()


async def audit_rows(conn, where: str = "TRUE", *args) -> list[dict]:
    """Rows of audit_events, JSON columns decoded."""
    rows = await conn.fetch(f"SELECT * FROM audit_events WHERE {where} ORDER BY seq", *args)
    decoded = []
    for row in rows:
        item = dict(row)
        for name in ("before", "after", "details"):
            if isinstance(item[name], str):
                item[name] = json.loads(item[name])
        decoded.append(item)
    return decoded
