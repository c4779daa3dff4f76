"""The admin CLI against a real HTTP server (uvicorn in a thread) serving the admin API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from agencyllm.serving.admin import router
from agencyllm.serving.cli.main import main
from agencyllm.serving.gateway.errors import install_error_handlers
from agencyllm.serving.gateway.identity import ensure_bootstrap_admin_key
from agencyllm.serving.gateway.services import Services
from agencyllm.serving.settings import Settings


def server_app(database_url: str, data_dir: Path) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The database handle lives in the server thread's own event loop.
        services = await Services.start(Settings(data_dir=data_dir, database_url=SecretStr(database_url)))
        services.install(app)
        await ensure_bootstrap_admin_key(services.database, data_dir)
        yield
        await services.aclose()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app


@pytest.fixture(scope="module")
def server(pg_url, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cli-data")
    config = uvicorn.Config(server_app(pg_url, data_dir), host="127.0.0.1", port=0, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(instance.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", data_dir
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def cli(server, monkeypatch, capsys):
    url, data_dir = server
    monkeypatch.delenv("AGENCYLLM_API_KEY", raising=False)
    monkeypatch.setenv("AGENCYLLM_DATA_DIR", str(data_dir))
    monkeypatch.setenv("AGENCYLLM_URL", url)
    monkeypatch.setattr("agencyllm.auth.login.cached_access_token", lambda *a, **k: None)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_tenant_quota_key_and_usage_commands(cli):
    name = f"c-{uuid.uuid4().hex[:8]}"
    code, out, _ = cli("tenants", "create", name, "--display-name", "Roads", "--keycloak-group", "/roads")
    assert code == 0 and "Roads" in out
    code, out, _ = cli("tenants", "list")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["NAME", "DISPLAY_NAME"] and name in out
    code, out, _ = cli("tenants", "show", name, "--format", "json")
    assert json.loads(out)["keycloak_group"] == "/roads"
    assert cli("tenants", "suspend", name)[0] == 0
    assert "active" in cli("tenants", "resume", name)[1]
    assert (
        json.loads(cli("tenants", "update", name, "--keycloak-group", "none", "--format", "json")[1])["keycloak_group"]
        is None
    )

    assert cli("quota", "set", name, "--tokens-per-day", "1000", "--allowed-models", "m1,m2")[0] == 0
    code, out, _ = cli("quota", "set", name, "--requests-per-minute", "5", "--format", "json")
    policy = json.loads(out)
    assert policy["tokens_per_day"] == 1000 and policy["requests_per_minute"] == 5
    assert policy["allowed_models"] == ["m1", "m2"]
    assert (
        json.loads(cli("quota", "set", name, "--tokens-per-day", "none", "--format", "json")[1])["tokens_per_day"]
        is None
    )
    assert json.loads(cli("quota", "show", name, "--user", "sub-1", "--format", "json")[1])["user"] == "sub-1"

    code, out, err = cli("keys", "create", "--tenant", name, "--name", "etl")
    assert code == 0 and out.strip().startswith("sk-agency-") and "not shown again" in err
    keys = json.loads(cli("keys", "list", "--tenant", name, "--format", "json")[1])
    assert [k["name"] for k in keys] == ["etl"]
    assert cli("keys", "revoke", keys[0]["id"])[0] == 0
    assert "(none)" in cli("keys", "list", "--tenant", name)[1]

    code, out, err = cli("keys", "create-frontend", "--serves", name, "--name", "chat", "--format", "json")
    frontend = json.loads(out)
    assert code == 0 and frontend["kind"] == "frontend" and frontend["serves_tenants"] == [name]
    assert frontend["tenant"] == "system" and frontend["key"].startswith("sk-agency-")
    code, _, err = cli("keys", "create-frontend", "--serves", "*", "--serves", name)
    assert code == 1 and "stands alone" in err

    code, out, _ = cli("usage", "--tenant", name, "--group-by", "model", "--format", "csv")
    assert code == 0 and next(csv.reader(io.StringIO(out))) == [
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ]
    assert "(no usage)" in cli("usage", "--tenant", name, "--since", "2026-01-01")[1]


def test_errors_are_one_line_and_non_zero(cli):
    code, out, err = cli("tenants", "show", "no-such-tenant")
    assert code == 1 and out == ""
    assert err.strip() == "error: No tenant named 'no-such-tenant'. (HTTP 404)"
    code, _, err = cli("tenants", "create", "Bad Name")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "HTTP 400" in err


def test_api_key_from_environment_wins(cli, monkeypatch):
    monkeypatch.setenv("AGENCYLLM_API_KEY", "sk-agency-aaaaaaaaaaaa_" + "A" * 43)
    code, _, err = cli("tenants", "list")
    assert code == 1 and "HTTP 401" in err


def test_unreachable_server(cli):
    code, _, err = cli("tenants", "list", "--url", "http://127.0.0.1:9")
    assert code == 1 and err.startswith("error: cannot reach http://127.0.0.1:9")


def test_negative_quota_rejected_locally(cli):
    with pytest.raises(SystemExit):
        cli("quota", "set", "anything", "--tokens-per-day", "-3")
