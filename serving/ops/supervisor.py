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

Start-up overlaps: the stack process is spawned first (importing vLLM and starting Ray take the
longest) while the supervisor starts Postgres and migrates; it hands the database URL over the
stack's stdin. The user sees one progress line per step (`[  4.0s] migrations at 0003`); Ray's,
Serve's and the engines' own output goes to `DATA_DIR/logs/agencyllm.log` (`--verbose`: the
terminal). The stack process reports its steps on a pipe (`--progress-fd`).
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
import traceback
from pathlib import Path

from agencyllm.serving.ops.local_db import bootstrap_admin_key
from agencyllm.serving.ops.progress import Progress, Reporter, say
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.up")

STOP_GRACE_SECONDS = 45.0
STACK_START_TIMEOUT_SECONDS = 600.0
KILL_GRACE_SECONDS = 5.0
TICK_SECONDS = 1.0
DATABASE_CHECK_SECONDS = 5.0
SERVE_COMMAND = "_serve"
LOG_FILE = Path("logs") / "agencyllm.log"  # under the data dir
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    def __init__(
        self, settings: Settings, model_dir: Path | None, *, verbose: bool = False, started: float | None = None
    ) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.verbose = verbose
        self.progress = Progress(time.monotonic() if started is None else started)
        self.log_file = settings.data_dir / LOG_FILE
        self._relay: threading.Thread | None = None
        self.stopping = threading.Event()
        self.postgres = None
        self.child: subprocess.Popen | None = None
        self._tree: dict[int, float] = {}  # pid → create time, every process of the stack seen
        self._database_ok: bool | None = None
        self._url: str | None = None
        self._next_database_check = 0.0
        self._restarting_database = False
        self.chat = None  # ChatFrontEnd with --chat

    # ---- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        code = 0
        try:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            if self.verbose:
                self.progress.step("Ray, Serve and engine logs follow here (--verbose)")
            else:
                self._log_to_file()
                self.progress.step(f"Ray, Serve and engine logs: {self.log_file} (--verbose shows them here)")
            self.child = self._spawn()
            url = self._url = self._start_database()
            admin_key = bootstrap_admin_key(self.settings.model_copy(update={"database_url": _secret(url)}))
            if admin_key is not None:
                print(f"Platform admin API key written to {admin_key} (readable by you only).", flush=True)
            self._hand_over(url)
            if self.settings.chat and not self.stopping.is_set():
                self._start_chat(url)
            if not self.stopping.is_set():
                code = self._watch()
        except Exception as exc:  # startup failed: say what, not a traceback
            say(f"could not start: {exc}")
            code = 1
        finally:
            print("Stopping agencyllm…", file=sys.stderr, flush=True)
            if self.chat is not None:
                self.chat.stop()
            self._stop_stack()
            self._stop_database()
            if self._relay is not None:
                self._relay.join(KILL_GRACE_SECONDS)
        return code

    def _log_to_file(self) -> None:
        """This process's log records go to the log file too; the terminal gets the progress."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)

    def _on_signal(self, signum: int, _frame) -> None:
        self.stopping.set()

    def _start_chat(self, database_url: str) -> None:
        from agencyllm.serving.ops.chat import ChatFrontEnd

        self.chat = ChatFrontEnd(self.settings)
        self.chat.start(database_url, self.settings.data_dir / "logs" / "open-webui.log")
        self.progress.step(f"staff chat (Open WebUI) starting at {self.chat.public_url}")

    def _watch(self) -> int:
        while not self.stopping.wait(TICK_SECONDS):
            self._remember_tree()
            if self.chat is not None and (chat_code := self.chat.exited()) is not None:
                self.progress.say(f"Open WebUI exited with status {chat_code}; its log: {self.chat.log_file}")
                self.chat = None
            code = self.child.poll()
            if code is not None:
                if code != 0:
                    where = "" if self.verbose else f"; its log: {self.log_file}"
                    self.progress.say(f"the serving stack exited with status {code}{where}")
                return 0 if code == 0 else 1
            try:
                self._keep_database()
            except Exception as exc:  # keep supervising: the next tick tries again
                say(f"database supervision failed ({type(exc).__name__}); retrying")
        return 0

    # ---- the embedded Postgres --------------------------------------------------------------

    def _start_database(self) -> str:
        """The embedded Postgres (unless a URL is configured), migrated to the schema's head."""
        from agencyllm.quotas.db import EmbeddedPostgres, head_revisions, upgrade_schema

        if self.settings.database_url is not None:
            url = self.settings.database_url.get_secret_value()
            self.progress.step("database: AGENCYLLM_DATABASE_URL")
        else:
            self.postgres = EmbeddedPostgres(self.settings.data_dir)
            url = self.postgres.start()
            self.progress.step("database ready")
        upgrade_schema(url)
        self.progress.step(f"migrations at {', '.join(sorted(head_revisions()))}")
        return url

    def _keep_database(self) -> None:
        now = time.monotonic()
        if self.postgres is not None and not self.postgres.alive():
            if not self._restarting_database:  # one line per outage, however many attempts it takes
                say("the embedded PostgreSQL server stopped unexpectedly; restarting it")
            try:
                self._url = self.postgres.restart()
                self._restarting_database = False
                say("the embedded PostgreSQL server is running again")
            except Exception as exc:
                self._restarting_database = True
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

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("AGENCYLLM_DATABASE_URL", None)  # handed over on stdin, once it is known
        env["AGENCYLLM_DATA_DIR"] = str(self.settings.data_dir)
        env["AGENCYLLM_HOST"] = self.settings.host
        env["AGENCYLLM_PORT"] = str(self.settings.port)
        if self.settings.config is not None:
            env["AGENCYLLM_CONFIG"] = str(self.settings.config)
        if self.settings.ray_address is not None:
            env["AGENCYLLM_RAY_ADDRESS"] = self.settings.ray_address
        progress_read, progress_write = os.pipe()
        command = [sys.executable, "-m", "agencyllm.serving.cli", SERVE_COMMAND, "--progress-fd", str(progress_write)]
        if self.model_dir is not None:
            command += ["--model", str(self.model_dir)]
        output = None
        if not self.verbose:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file, "a", buffering=1)
            output.write(f"---- agencyllm up, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        try:
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the
            # stack in order; and every process Ray starts can be found by session afterwards.
            child = subprocess.Popen(
                command,
                env=env,
                start_new_session=True,
                stdin=subprocess.PIPE,
                text=True,
                stdout=output,
                stderr=output,
                pass_fds=(progress_write,),
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            os.close(progress_write)
            if output is not None:
                output.close()
        self._relay = threading.Thread(
            target=self.progress.relay,
            args=(os.fdopen(progress_read, encoding="utf-8", errors="replace"),),
            daemon=True,
        )
        self._relay.start()
        return child

    def _hand_over(self, database_url: str) -> None:
        """The stack process waits (after starting Ray) for the database URL on its stdin."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.child.stdin.write(database_url + "\n")
            self.child.stdin.close()

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
        with contextlib.suppress(OSError):  # a stack still waiting for the database URL stops
            self.child.stdin.close()
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


def _preload_engine_libraries() -> None:
    """Import torch, transformers and vLLM (about half of the application's import time) while
    Ray starts. Nothing that imports Ray, FastAPI or pydantic.v1 belongs here: `ray.init` and
    `serve.start` import those in the main thread at the same time, and two threads importing
    the same packages in different orders can make Python's import deadlock detection hand one
    of them a half-initialised module (seen as `KeyError: 'pydantic.v1'`). These three share
    only leaf standard-library modules with Ray's start; the application itself is imported by
    `deploy()`, in the main thread."""
    with contextlib.suppress(Exception):  # deploy() imports them again and reports any error
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import vllm  # noqa: F401


def serve(settings: Settings, model_dir: Path | None, progress_fd: int | None = None) -> int:
    """The stack process: Ray, engines and ingress, until SIGTERM or SIGINT. The database URL
    comes on stdin (the supervisor starts the database meanwhile)."""
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.ops.stack import LocalStack, resolve_models

    reporter = Reporter(progress_fd)
    try:
        serving, _ = resolve_models(settings, model_dir)
    except ConfigError as exc:
        reporter.say(str(exc))
        return 2
    stopping = threading.Event()

    def handle(*_):
        stopping.set()

    def install() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handle)

    install()
    import ray  # noqa: F401 - before the preload thread: the two threads never import Ray at once
    from ray import serve as _serve  # noqa: F401

    preload = threading.Thread(target=_preload_engine_libraries, daemon=True)
    preload.start()
    stack = LocalStack(settings, serving, progress=reporter.step, log_to_driver=True)
    try:
        # ray.init replaces the SIGTERM handler (Python's and a native one that aborts): take it back.
        stack.start_ray(on_ray_started=install)
        install()
        url = sys.stdin.readline().strip()
        if stopping.is_set() or not url:  # the supervisor is stopping (or could not start the database)
            return 0
        stack.settings = stack.settings.model_copy(update={"database_url": _secret(url)})
        preload.join()
        stack.deploy()
        stack.wait_ready(STACK_START_TIMEOUT_SECONDS, stopping=stopping)
        if stopping.is_set():
            return 0
        reporter.step(f"Ready: {stack.base_url}/v1")
        while not stopping.wait(1):
            pass
    except SystemExit:  # Ray's handler, when the signal came during start
        pass
    except Exception as exc:
        traceback.print_exc()  # to the log file: this process's output goes there
        ours = type(exc).__module__.startswith("agencyllm.")  # a reason worded for the user
        reporter.say(
            f"could not start: {exc}"
            if ours
            else f"could not start: {type(exc).__name__}: {exc} (details in the log file)"
        )
        return 1
    finally:
        stack.stop()
    return 0
