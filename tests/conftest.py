"""Session fixtures: one embedded Postgres, one local OIDC issuer and, for the tests that need it,
one real stack (Ray Serve + vLLM CPU engines + our ingress) started once per session."""

from __future__ import annotations

import asyncio
import site
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from oidc_issuer import LocalOIDCIssuer, fresh_oidc_issuer, oidc_issuer  # noqa: F401
from pg import make_tenant, pg_db, pg_url  # noqa: F401
from pydantic import SecretStr

from agencyllm.quotas.db import Database
from agencyllm.serving.ops.stack import LocalStack, default_models
from agencyllm.serving.settings import Settings

STACK_GROUP = "office-stack"
STACK_TENANT = "stack"
STACK_DIRECTORY_CLIENT = ("agencyllm-directory", "stack-directory-secret")


def pytest_collection_modifyitems(items):
    """Fault tests (marked `fault`) kill engines, Postgres or whole stacks: run them after the rest."""
    items.sort(key=lambda item: item.get_closest_marker("fault") is not None)


# Where this run's packages live when they are not the base Python's (a project venv): venvs made
# from the base Python for the wheel and Ansible tests are pointed at them.
RUNNER_SITE = [p for p in site.getsitepackages() if not p.startswith(sys.base_prefix)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningStack:
    stack: LocalStack
    issuer: LocalOIDCIssuer
    tenant: str
    api_key: str
    admin_key: str

    @property
    def url(self) -> str:
        return self.stack.base_url

    @property
    def v1(self) -> str:
        return f"{self.stack.base_url}/v1"

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    def openai(self, api_key: str | None = None, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=api_key or self.api_key, max_retries=0, **kwargs)

    @property
    def serve_logs(self) -> Path:
        """This session's Ray Serve logs (not /tmp/ray/session_latest: another Ray may be running)."""
        import ray

        context = ray.get_runtime_context()  # the session's logs: <temp dir>/<session name>/logs
        return Path(context.get_temp_dir()) / context.get_session_name() / "logs" / "serve"

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin_key}"}, timeout=30)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, pg_url, oidc_issuer) -> Iterator[RunningStack]:  # noqa: F811
    data_dir = tmp_path_factory.mktemp("agencyllm")
    oidc_issuer.add_directory_client(*STACK_DIRECTORY_CLIENT)
    settings = Settings(
        data_dir=data_dir,
        port=free_port(),
        database_url=SecretStr(pg_url),
        oidc_issuer=oidc_issuer.issuer,
        oidc_directory_client_id=STACK_DIRECTORY_CLIENT[0],
        oidc_directory_client_secret=SecretStr(STACK_DIRECTORY_CLIENT[1]),
        ingress_replicas=2,
        max_request_bytes=256 * 1024,
        reservation_lease_seconds=30,
        access_log=True,  # tests read Serve's access log: which replica served, cancelled engine calls
        file_max_bytes=8 * 1024 * 1024,
        file_storage_bytes_per_tenant=24 * 1024 * 1024,
        batch_lease_seconds=10,
    )
    running = LocalStack(settings, default_models(data_dir))
    try:
        running.start(timeout=900)
        tenant, api_key, admin_key = asyncio.run(_stack_identities(pg_url, data_dir))
        ready = RunningStack(running, oidc_issuer, tenant, api_key, admin_key)
        _warm_up(ready)
        yield ready
    finally:
        running.stop()


def _warm_up(stack: RunningStack) -> None:
    """First calls through cold replicas are slow; tests that time things should not pay for them.
    Right after start an ingress replica may still hold an engine for down (its health check timed
    out while the engine was starting on a loaded machine): it answers 503 with Retry-After, and
    the client retries, as a client should."""
    import openai

    client = stack.openai().with_options(max_retries=0)
    hello = [{"role": "user", "content": "hi"}]
    calls = [
        lambda: client.chat.completions.create(model="placeholder", messages=hello, max_tokens=2),
        lambda: list(client.chat.completions.create(model="placeholder", messages=hello, max_tokens=2, stream=True)),
        lambda: client.embeddings.create(model="all-MiniLM-L6-v2", input="hi"),
    ]
    deadline = time.monotonic() + 120
    for call in calls:
        while True:
            try:
                call()
                break
            except openai.InternalServerError as exc:
                if exc.status_code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(float(exc.response.headers.get("retry-after", "1")))


async def _stack_identities(database_url: str, data_dir) -> tuple[str, str, str]:
    """A tenant (mapped to a Keycloak group) with a staff key, and the bootstrap platform-admin key."""
    from agencyllm.quotas import store
    from agencyllm.serving.gateway.identity import ensure_bootstrap_admin_key

    database = Database(database_url)
    try:
        admin_key_file = await ensure_bootstrap_admin_key(database, data_dir)
        async with database.sessions() as session:
            actor = store.SystemActor()
            await store.create_tenant(
                session, actor, name=STACK_TENANT, display_name="Stack tests", keycloak_group=STACK_GROUP
            )
            staff = await store.create_key(
                session,
                actor,
                tenant_name=STACK_TENANT,
                kind="personal",
                name="tests",
                owner_subject="staff-1",
                owner_username="staff",
            )
        return STACK_TENANT, staff.secret, admin_key_file.read_text().strip()
    finally:
        await database.dispose()
