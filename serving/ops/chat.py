"""`agencyllm up --chat`: Open WebUI beside the local platform, as the supervisor's second child.

Open WebUI lives in a virtualenv of its own (its dependencies and the engines' cannot share one);
`AGENCYLLM_CHAT_COMMAND` names its `open-webui` executable. Before it starts, the platform gives
it what an install would: a front-end key serving every tenant (kept in `DATA_DIR/chat/`, minted
again if revoked), its own database `openwebui` on the platform's Postgres server, and a session
secret. Staff sign in through the realm (AGENCYLLM_OIDC_ISSUER, the `open-webui` client); each
chat is then theirs on the platform (docs/chat.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agencyllm.quotas.models import ALL_TENANTS
from agencyllm.serving.gateway.identity import ensure_key_file, write_private
from agencyllm.serving.ops.chat_env import ChatInstall, install_environment
from agencyllm.serving.settings import Settings

CHAT_DIR = "chat"
KEY_FILE = "frontend.key"
SECRET_FILE = "webui-secret.key"
DATABASE = "openwebui"
STOP_SECONDS = 20.0


class ChatUnavailable(Exception):
    """`up --chat` cannot start Open WebUI; the message says what to set."""


def chat_command(settings: Settings) -> str:
    found = shutil.which(settings.chat_command)
    if found is None:
        raise ChatUnavailable(
            f"Open WebUI's executable '{settings.chat_command}' was not found. Install it in a virtualenv of "
            "its own (docs/chat.md, 'On one machine') and set AGENCYLLM_CHAT_COMMAND to its bin/open-webui."
        )
    return found


def check_chat_settings(settings: Settings) -> None:
    """What `--chat` needs before anything starts."""
    missing = [
        name
        for name, value in (
            ("AGENCYLLM_OIDC_ISSUER", settings.oidc_issuer),
            ("AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID", settings.oidc_directory_client_id),
            ("AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET", settings.oidc_directory_client_secret),
            ("AGENCYLLM_CHAT_CLIENT_SECRET", settings.chat_client_secret),
        )
        if not value
    ]
    if missing:
        raise ChatUnavailable(
            "--chat signs staff in through Keycloak and finds each of them in the realm's directory; "
            f"set {', '.join(missing)} (docs/chat.md)."
        )
    chat_command(settings)


def chat_database_url(platform_url: str) -> str:
    """The platform's Postgres server, database `openwebui`."""
    parts = urlsplit(platform_url)
    return urlunsplit(parts._replace(path=f"/{DATABASE}"))


async def _ensure_database(platform_url: str) -> None:
    import asyncpg

    from agencyllm.quotas.db import asyncpg_connect_args

    connection = await asyncpg.connect(**asyncpg_connect_args(platform_url))
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await connection.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await connection.close()


async def _frontend_key(platform_url: str, path: Path) -> str:
    """The key in `path` while it is live; else a new one serving every tenant, written there."""
    from agencyllm.quotas.db import Database

    database = Database(platform_url)
    try:
        await ensure_key_file(
            database, path, kind="frontend", name="open-webui (agencyllm up --chat)", serves_tenants=[ALL_TENANTS]
        )
    finally:
        await database.dispose()
    return path.read_text(encoding="utf-8").strip()


def _session_secret(path: Path) -> str:
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text(encoding="utf-8").strip()


class ChatFrontEnd:
    """Open WebUI started against the local platform, stopped with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.data_dir / CHAT_DIR
        self.process: subprocess.Popen | None = None
        self.log_file: Path | None = None

    @property
    def public_url(self) -> str:
        return self.settings.chat_public_url or f"http://127.0.0.1:{self.settings.chat_port}"

    def environment(self, platform_url: str) -> dict[str, str]:
        settings = self.settings
        assert settings.oidc_issuer and settings.chat_client_secret  # check_chat_settings
        if settings.chat_database_url is not None:
            database_url = settings.chat_database_url.get_secret_value()
        else:
            asyncio.run(_ensure_database(platform_url))
            database_url = chat_database_url(platform_url)
        api_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        install = ChatInstall(
            api_base_url=f"http://{api_host}:{settings.port}/v1",
            frontend_key=asyncio.run(_frontend_key(platform_url, self.directory / KEY_FILE)),
            public_url=self.public_url,
            oidc_issuer=settings.oidc_issuer,
            client_id=settings.chat_client_id,
            client_secret=settings.chat_client_secret.get_secret_value(),
            database_url=database_url,
            secret_key=_session_secret(self.directory / SECRET_FILE),
            data_dir=str(self.directory / "data"),
            keep_history=settings.chat_history,
        )
        return install_environment(install)

    def start(self, platform_url: str, log_file: Path) -> None:
        environment = self.environment(platform_url)
        (self.directory / "data").mkdir(parents=True, exist_ok=True, mode=0o700)
        base = {k: v for k, v in os.environ.items() if not k.startswith("AGENCYLLM_")}
        command = [
            chat_command(self.settings),
            "serve",
            "--host",
            self.settings.chat_host,
            "--port",
            str(self.settings.chat_port),
        ]
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a", buffering=1) as output:
            self.process = subprocess.Popen(
                command,
                env=base | environment,
                cwd=self.directory,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
