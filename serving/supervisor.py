"""`agencyllm up`: a small supervisor that owns the embedded Postgres and runs the Ray stack in a
child process of its own session.

Why two processes: `ray.init` replaces the driver's SIGTERM handler, and a Ray driver torn down
by a signal can abort in native code, skipping every `finally`. The supervisor imports no Ray,
so its signal handlers stay its own and its stop path always runs, within a bounded time:

1. SIGTERM or SIGINT → SIGTERM to the stack process, which shuts Serve and Ray down;
2. after `STOP_GRACE_SECONDS`, whatever of the stack's process tree or session is left is killed;
3. the embedded Postgres is stopped last (the ingress settles usage into it until the end).

While running, it restarts the embedded Postgres if it dies and says once when the database
becomes unreachable and once when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.up")

STOP_GRACE_SECONDS = 45.0
KILL_GRACE_SECONDS = 5.0
TICK_SECONDS = 1.0
DATABASE_CHECK_SECONDS = 5.0
SERVE_COMMAND = "_serve"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def say(message: str) -> None:
    print(f"agencyllm: {message}", file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, settings: Settings, model_dir: Path | None) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.stopping = threading.Event()
        self.postgres = None
        self.child: subprocess.Popen | None = None
        self._tree: dict[int, float] = {}  # pid → create time, every process of the stack seen
        self._database_ok: bool | None = None
        self._url: str | None = None
        self._next_database_check = 0.0

    # ---- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        code = 0
        try:
            url = self._url = self._start_database()
            from agencyllm.serving.cli import _bootstrap_admin_key

            admin_key = _bootstrap_admin_key(self.settings.model_copy(update={"database_url": _secret(url)}))
            if admin_key is not None:
                print(f"Platform admin API key written to {admin_key} (readable by you only).", flush=True)
            if not self.stopping.is_set():
                self.child = self._spawn(url)
                code = self._watch()
        except Exception as exc:  # startup failed: say what, not a traceback
            say(f"could not start: {exc}")
            code = 1
        finally:
            print("Stopping agencyllm…", file=sys.stderr, flush=True)
            self._stop_stack()
            self._stop_database()
        return code

    def _on_signal(self, signum: int, _frame) -> None:
        self.stopping.set()

    def _watch(self) -> int:
        while not self.stopping.wait(TICK_SECONDS):
            self._remember_tree()
            code = self.child.poll()
            if code is not None:
                if code != 0:
                    say(f"the serving stack exited with status {code}")
                return 0 if code == 0 else 1
            try:
                self._keep_database()
            except Exception as exc:  # keep supervising: the next tick tries again
                say(f"database supervision failed ({type(exc).__name__}); retrying")
        return 0

    # ---- the embedded Postgres --------------------------------------------------------------

    def _start_database(self) -> str:
        if self.settings.database_url is not None:
            return self.settings.database_url.get_secret_value()
        from agencyllm.quotas.db import EmbeddedPostgres, upgrade_schema

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.postgres = EmbeddedPostgres(self.settings.data_dir)
        url = self.postgres.start()
        upgrade_schema(url)
        return url

    def _keep_database(self) -> None:
        now = time.monotonic()
        if self.postgres is not None and not self.postgres.alive():
            say("the embedded PostgreSQL server stopped unexpectedly; restarting it")
            try:
                self._url = self.postgres.restart()
                say("the embedded PostgreSQL server is running again")
            except Exception as exc:
                say(f"could not restart the embedded PostgreSQL server ({type(exc).__name__}); retrying")
            self._next_database_check = 0.0
        if now < self._next_database_check:
            return
        self._next_database_check = now + DATABASE_CHECK_SECONDS
        ok = self._database_answers()
        if ok != self._database_ok:
            if not ok:
                say("the database is unreachable: requests get 503 until it is back")
            elif self._database_ok is False:
                say("the database is reachable again")
            self._database_ok = ok

    def _database_answers(self) -> bool:
        from agencyllm.quotas.db import CONNECT_TIMEOUT_SECONDS, asyncpg_connect_args

        url = self._url

        async def ping() -> None:
            import asyncpg

            connection = await asyncpg.connect(timeout=CONNECT_TIMEOUT_SECONDS, **asyncpg_connect_args(url))
            try:
                await connection.fetchval("SELECT 1")
            finally:
                await connection.close()

        try:
            asyncio.run(ping())
            return True
        except Exception:
            return False

    def _stop_database(self) -> None:
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except Exception as exc:
                say(f"could not stop the embedded PostgreSQL server cleanly ({type(exc).__name__})")
            self.postgres = None

    # ---- the serving stack ------------------------------------------------------------------

    def _spawn(self, database_url: str) -> subprocess.Popen:
        env = dict(os.environ)
        env["AGENCYLLM_DATABASE_URL"] = database_url
        env["AGENCYLLM_DATA_DIR"] = str(self.settings.data_dir)
        env["AGENCYLLM_HOST"] = self.settings.host
        env["AGENCYLLM_PORT"] = str(self.settings.port)
        if self.settings.config is not None:
            env["AGENCYLLM_CONFIG"] = str(self.settings.config)
        command = [sys.executable, "-m", "agencyllm.serving.cli", SERVE_COMMAND]
        if self.model_dir is not None:
            command += ["--model", str(self.model_dir)]
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the stack
        # in order; and every process Ray starts can be found by session afterwards.
        return subprocess.Popen(
            command, env=env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _remember_tree(self) -> None:
        import psutil

        if self.child is None:
            return
        try:
            root = psutil.Process(self.child.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self._tree.setdefault(process.pid, process.create_time())
        except psutil.Error:
            pass

    def _leftovers(self) -> list:
        """Processes of the stack still alive: its tree as seen, and anything in its session."""
        import psutil

        found = {}
        for pid, created in self._tree.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = process
        if self.child is not None:
            for process in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(process.pid) == self.child.pid and process.status() != psutil.STATUS_ZOMBIE:
                        found[process.pid] = process
        found.pop(os.getpid(), None)
        return list(found.values())

    def _stop_stack(self) -> None:
        import psutil

        if self.child is None:
            return
        self._remember_tree()
        if self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                say(f"the serving stack did not stop within {STOP_GRACE_SECONDS:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.child.kill()
                self.child.wait()
        left = self._leftovers()
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(left, timeout=KILL_GRACE_SECONDS)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=KILL_GRACE_SECONDS)


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def serve(settings: Settings, model_dir: Path | None) -> int:
    """The stack process: Ray, engines and ingress, until SIGTERM or SIGINT."""
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.stack import LocalStack, resolve_models

    try:
        serving, _ = resolve_models(settings, model_dir)
    except ConfigError as exc:
        say(str(exc))
        return 2
    stopping = threading.Event()

    def handle(*_):
        stopping.set()

    def install() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handle)

    install()
    stack = LocalStack(settings, serving)
    try:
        # ray.init replaces the SIGTERM handler (Python's and a native one that aborts): take it back.
        stack.start(on_ray_started=install, stopping=stopping)
        install()
        if stopping.is_set():
            return 0
        print(f"Ready: {stack.base_url}/v1", flush=True)
        while not stopping.wait(1):
            pass
    except SystemExit:  # Ray's handler, when the signal came during start
        pass
    except Exception as exc:
        say(f"could not start: {exc}")
        return 1
    finally:
        stack.stop()
    return 0
