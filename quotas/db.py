"""Database handle (engine and pools), availability, and schema upgrade/check. The embedded server
for local runs is `quotas.embedded` (`EmbeddedPostgres` is re-exported here)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

# Re-exported: callers start the embedded server from here.
from agencyllm.quotas.embedded import EmbeddedPostgres as EmbeddedPostgres

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

LEDGER_CONNECTIONS = 10
# API-key lookups have connections of their own: a lookup never queues behind ledger writes
# waiting for their commit (seconds on a busy disk).
LOOKUP_CONNECTIONS = 2
# A server that does not answer a connection attempt within this is as good as down: callers get
# 503 at once rather than waiting on asyncpg's 60 s default.
CONNECT_TIMEOUT_SECONDS = 5
# What clients are told to wait before retrying while the database is down.
RETRY_AFTER_SECONDS = 5
DEFAULT_PORT = 5432


class SchemaOutOfDate(RuntimeError):
    pass


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached (down, restarting, network): callers answer 503."""


UNAVAILABLE_ERRORS = (
    OSError,  # refused, reset, timed out, socket missing
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # connection closed under a query
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, starting up
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a broken pooled connection's reset; no host is a primary (yet)
    asyncpg.ReadOnlySQLTransactionError,  # a write reached a standby: not the primary (any more)
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free
    sqlalchemy.exc.DBAPIError,  # decided by database_unavailable: only when it wraps one of these
    DatabaseUnavailable,
)


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: SQLAlchemy wraps asyncpg wraps OSError) means that the
    database is unreachable, as opposed to a query that failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            if current.connection_invalidated:
                return True
        elif isinstance(current, UNAVAILABLE_ERRORS):
            return True
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


class Availability:
    """Says once that the database went away and once that it is back, not once per request."""

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self.outages = 0  # pools compare it to drop the connections they held before an outage

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        log.error("database unavailable (%s): requests get 503 until it is back", type(exc).__name__)

    def ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("database reachable again after %.0f s", time.monotonic() - since)


# One per process: what the logs say about the database is about this process's view of it.
availability = Availability()


def async_url(url: str | URL) -> URL:
    """`postgresql://…` (any driver, TCP or `?host=/socket/dir`) as a `postgresql+asyncpg` URL.
    Several hosts (libpq's `h1:p1,h2:p2`, `?host=h1:p1&host=h2:p2`, `?host=h1,h2&port=p1,p2`)
    become the last form, which both SQLAlchemy's dialect and asyncpg read as a list to try in order."""
    parsed = make_url(_libpq_hosts_to_query(url)) if isinstance(url, str) else url
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    parsed = parsed.set(drivername="postgresql+asyncpg")
    hosts = _hosts(parsed)
    if hosts is None:
        return parsed
    return parsed.update_query_dict(
        {"host": ",".join(host for host, _ in hosts), "port": ",".join(str(port) for _, port in hosts)}
    )


# libpq's multi-host authority (`user@h1:5432,h2:5433/db`), which SQLAlchemy's parser rejects.
_MULTI_HOST_AUTHORITY = re.compile(
    r"^(?P<scheme>[^:/]+://)(?P<user>[^@/]*@)?(?P<hosts>[^/?]*,[^/?]*)(?P<rest>[/?].*)?$"
)


def _libpq_hosts_to_query(url: str) -> str:
    match = _MULTI_HOST_AUTHORITY.match(url)
    if match is None:
        return url
    path, _, query = (match["rest"] or "").partition("?")
    hosts = "&".join(f"host={item}" for item in match["hosts"].split(","))
    return f"{match['scheme']}{match['user'] or ''}{path or '/'}?{hosts}{'&' + query if query else ''}"


def _host_and_port(item: str, port: str | None) -> tuple[str, int]:
    """`h`, `h:p`, `[v6]:p` or a socket directory, with `port` (else 5432) when it names none."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, int(rest[1:] or port or DEFAULT_PORT)
    if not item.startswith("/") and item.count(":") == 1:
        host, _, given = item.partition(":")
        return host, int(given or port or DEFAULT_PORT)
    return item, int(port or DEFAULT_PORT)


def _hosts(parsed: URL) -> list[tuple[str, int]] | None:
    """The hosts to try, in order, when the URL names more than one; else None."""
    raw_hosts = parsed.query.get("host")
    if raw_hosts is None:
        return None
    hosts = [h for item in _as_tuple(raw_hosts) for h in item.split(",") if h]
    if len(hosts) < 2:
        return None
    ports = [p for item in _as_tuple(parsed.query.get("port", ())) for p in item.split(",") if p]
    if len(ports) > 1 and len(ports) != len(hosts):
        raise ValueError(f"{len(hosts)} database hosts but {len(ports)} ports")
    given: list[str | None] = list(ports) if len(ports) > 1 else [ports[0] if ports else None] * len(hosts)
    return [_host_and_port(host, port) for host, port in zip(hosts, given, strict=True)]


def _as_tuple(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


def asyncpg_connect_args(url: str | URL) -> dict[str, Any]:
    parsed = async_url(url)
    args: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password or None,
        "database": parsed.database,
    }
    query = dict(parsed.query)
    hosts = _hosts(parsed)
    if hosts is not None:
        query.pop("host"), query.pop("port")
        args["host"], args["port"] = [h for h, _ in hosts], [p for _, p in hosts]
    if "host" in query:  # unix socket directory
        args["host"] = query.pop("host")
    if "port" in query:
        port = query.pop("port")
        args["port"] = int(port if isinstance(port, str) else port[-1])
    # A connection parameter, not a server setting: each new connection (pooled ones too) must be
    # to a server that takes writes, so a standby, or a demoted primary, is passed over.
    if "target_session_attrs" in query:
        args["target_session_attrs"] = query.pop("target_session_attrs")
    if query:
        args["server_settings"] = {k: v for k, v in query.items() if isinstance(v, str)}
    return {k: v for k, v in args.items() if v is not None}


class Database:
    """One engine (ORM sessions for admin code) plus a raw asyncpg pool for the ledger's hot path,
    where SQLAlchemy's per-statement overhead would dominate a sub-millisecond call."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.pool_size = pool_size
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=0,
            pool_pre_ping=True,
            pool_timeout=10,
            connect_args={"timeout": CONNECT_TIMEOUT_SECONDS},
        )
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)
        self._pool: asyncpg.Pool | None = None
        self._lookup_pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._outages_seen = availability.outages

    async def pool(self) -> asyncpg.Pool:
        """The ledger's pool. It batches its calls: a few connections carry any load."""
        await self._after_outage()
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await self._create_pool(min(self.pool_size, LEDGER_CONNECTIONS))
        return self._pool

    async def lookup_pool(self) -> asyncpg.Pool:
        """Short reads on the request path (API-key lookups), apart from the ledger's writes."""
        await self._after_outage()
        if self._lookup_pool is None:
            async with self._pool_lock:
                if self._lookup_pool is None:
                    self._lookup_pool = await self._create_pool(LOOKUP_CONNECTIONS)
        return self._lookup_pool

    async def _after_outage(self) -> None:
        """Once per outage, replace every pooled connection as it is next taken. A connection that
        still looks open may be to the old primary after a failover (cut off, fenced or demoted),
        and only a new one is checked against `target_session_attrs`."""
        if self._outages_seen == availability.outages:
            return
        self._outages_seen = availability.outages
        for pool in (self._pool, self._lookup_pool):
            if pool is not None:
                await pool.expire_connections()
        await self.engine.dispose()  # a fresh SQLAlchemy pool; pre-ping alone passes a standby

    async def _create_pool(self, size: int) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            min_size=1,
            max_size=size,
            timeout=CONNECT_TIMEOUT_SECONDS,
            **asyncpg_connect_args(self.url),
        )

    async def ping(self) -> None:
        pool = await self.pool()
        await pool.fetchval("SELECT 1")
        availability.ok()

    async def dispose(self) -> None:
        pools = [pool for pool in (self._pool, self._lookup_pool) if pool is not None]
        self._pool = self._lookup_pool = None
        for pool in pools:
            await pool.close()
        await self.engine.dispose()


def _alembic_config(url: str | URL) -> Config:
    from alembic.config import Config

    script_location = resources.files("agencyllm.migrations")
    config = Config(str(script_location / "alembic.ini"))
    config.set_main_option("script_location", str(script_location))
    # Alembic's ini interpolation treats % specially.
    rendered = async_url(url).render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", rendered)
    return config


def upgrade_schema(url: str) -> None:
    """Alembic `upgrade head`. Safe to call from inside a running event loop (runs in a thread)."""
    from alembic import command

    def run() -> None:
        command.upgrade(_alembic_config(url), "head")

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        run()
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(run).result()


def head_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(_alembic_config("postgresql://localhost/x")).get_heads())


async def assert_schema_current(db: Database) -> None:
    from alembic.runtime.migration import MigrationContext

    async with db.engine.connect() as conn:
        current = await conn.run_sync(lambda sync_conn: set(MigrationContext.configure(sync_conn).get_current_heads()))
    expected = head_revisions()
    if current != expected:
        have = ", ".join(sorted(current)) or "none"
        raise SchemaOutOfDate(
            f"The database schema is at revision {have}, this release needs "
            f"{', '.join(sorted(expected))}. Run `agencyllm db upgrade` and start again."
        )
