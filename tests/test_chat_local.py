"""`agencyllm up --chat`'s preparation, without Open WebUI itself (tests/test_chat_open_webui.py runs
it): the settings it needs, its front-end key, its database and the environment it is given."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid

import pytest
from pydantic import SecretStr

from agencyllm.quotas import store
from agencyllm.quotas.db import Database
from agencyllm.serving.cli.main import main
from agencyllm.serving.ops import chat_env
from agencyllm.serving.ops.chat import (
    KEY_FILE,
    ChatFrontEnd,
    ChatUnavailable,
    chat_database_url,
    check_chat_settings,
)
from agencyllm.serving.settings import Settings

ISSUER = "https://sso.agency.example/realms/agency"


def chat_settings(tmp_path, **changes) -> Settings:
    fake = tmp_path / "bin" / "open-webui"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    values = {
        "data_dir": tmp_path / "data",
        "port": 8123,
        "oidc_issuer": ISSUER,
        "oidc_directory_client_id": "agencyllm-directory",
        "oidc_directory_client_secret": SecretStr("d"),
        "chat": True,
        "chat_command": str(fake),
        "chat_client_secret": SecretStr("c"),
    }
    return Settings(**(values | changes))


def test_chat_needs_keycloak_its_directory_and_open_webui(tmp_path):
    check_chat_settings(chat_settings(tmp_path))
    with pytest.raises(ChatUnavailable) as missing:
        check_chat_settings(chat_settings(tmp_path, oidc_issuer=None, chat_client_secret=None))
    assert "AGENCYLLM_OIDC_ISSUER" in str(missing.value) and "AGENCYLLM_CHAT_CLIENT_SECRET" in str(missing.value)
    with pytest.raises(ChatUnavailable, match="AGENCYLLM_CHAT_COMMAND"):
        check_chat_settings(chat_settings(tmp_path, chat_command=str(tmp_path / "nowhere" / "open-webui")))


def test_up_chat_refuses_before_starting_anything(tmp_path, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith("AGENCYLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AGENCYLLM_DATA_DIR", str(tmp_path))
    assert main(["up", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "AGENCYLLM_OIDC_ISSUER" in err and "docs/chat.md" in err
    assert not (tmp_path / "postgres").exists(), "the database was started"


def test_environment_key_and_database(tmp_path, pg_url):
    front_end = ChatFrontEnd(chat_settings(tmp_path))
    env = front_end.environment(pg_url)
    assert {k: env[k] for k in chat_env.FIXED_ENVIRONMENT} == chat_env.FIXED_ENVIRONMENT
    assert {k: env[k] for k in chat_env.HISTORY_OFF} == chat_env.HISTORY_OFF
    assert env["OPENAI_API_BASE_URL"] == "http://127.0.0.1:8123/v1"
    assert env["OPENID_PROVIDER_URL"] == f"{ISSUER}/.well-known/openid-configuration"
    assert env["WEBUI_URL"] == "http://127.0.0.1:8080" and env["OAUTH_CLIENT_SECRET"] == "c"
    assert env["DATABASE_URL"] == chat_database_url(pg_url) and "/openwebui" in env["DATABASE_URL"]

    # The key: a front-end key serving every tenant, 0600, the same on the next start.
    key_file = front_end.directory / KEY_FILE
    assert env["OPENAI_API_KEY"] == env["FORWARD_USER_INFO_HEADER_JWT_SECRET"] == key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert front_end.environment(pg_url)["OPENAI_API_KEY"] == env["OPENAI_API_KEY"]

    async def check() -> None:
        database = Database(pg_url)
        try:
            live = await store.find_active_key(await database.pool(), env["OPENAI_API_KEY"])
            assert live is not None and live.kind == "frontend" and live.serves(f"any-{uuid.uuid4().hex[:6]}")
            assert await (await database.pool()).fetchval("SELECT 1 FROM pg_database WHERE datname = 'openwebui'")
            async with database.sessions() as session:
                await store.revoke_key(session, store.SystemActor(), live.id)
        finally:
            await database.dispose()

    asyncio.run(check())
    # A revoked key is replaced at the next start; the session secret stays.
    again = front_end.environment(pg_url)
    assert again["OPENAI_API_KEY"] != env["OPENAI_API_KEY"] and again["WEBUI_SECRET_KEY"] == env["WEBUI_SECRET_KEY"]


def test_history_on_and_a_database_of_its_own(tmp_path, pg_url):
    url = "postgresql://owui:secret@db.agency.example:5432/chat"
    front_end = ChatFrontEnd(chat_settings(tmp_path, chat_history=True, chat_database_url=SecretStr(url)))
    env = front_end.environment(pg_url)
    assert {k: env[k] for k in chat_env.HISTORY_ON} == chat_env.HISTORY_ON and env["DATABASE_URL"] == url


def test_start_and_stop(tmp_path, pg_url):
    """The process is started in its own session with the environment, and stopped."""
    script = tmp_path / "fake-open-webui"
    script.write_text('#!/bin/sh\nenv > "$DATA_DIR/../env.txt"\nexec sleep 600\n')
    script.chmod(0o755)
    front_end = ChatFrontEnd(chat_settings(tmp_path, chat_command=str(script)))
    front_end.start(pg_url, tmp_path / "logs" / "open-webui.log")
    try:
        env_file = front_end.directory / "env.txt"
        for _ in range(100):
            if env_file.exists() and "DATA_DIR" in env_file.read_text():
                break
            asyncio.run(asyncio.sleep(0.05))
        seen = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        assert seen["ENABLE_OLLAMA_API"] == "false" and not any(k.startswith("AGENCYLLM_") for k in seen)
        assert front_end.exited() is None
    finally:
        front_end.stop()
    assert front_end.process is None
