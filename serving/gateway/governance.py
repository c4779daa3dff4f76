"""The ingress' data-governance hooks, kept out of the request path's straight line:

- `RequestSource`: ASGI middleware that makes the caller's address known to the audit records
  written deeper in the call (authentication failures, refusals, settlement);
- `Governance.salt`: each tenant's engine requests carry a vLLM `cache_salt` (HMAC of the tenant
  with a per-install secret), so prefix-cache hits never cross tenants;
- `Governance.keep_response` / `Governance.tap`: prompts and outputs are stored only for
  tenants that opted in to content retention, off the response's path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from agencyllm.quotas.audit import request_source
from agencyllm.quotas.compliance.governance import ContentPolicy, cache_salt_secret, tenant_cache_salt
from agencyllm.quotas.compliance.retention import Retention
from agencyllm.quotas.db import Database
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.governance")


class RequestSource:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        token = request_source.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            request_source.reset(token)


def prompt_of(body: Any) -> Any:
    for name in ("messages", "prompt", "input"):
        value = getattr(body, name, None)
        if value is not None:
            return json.loads(json.dumps(value, default=_plain))
    return None


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, (set, tuple)) or hasattr(value, "__iter__"):
        return list(value)
    return str(value)


def _texts(choices: list[dict[str, Any]]) -> list[str]:
    out = []
    for choice in choices or []:
        part = (
            choice.get("text")
            or (choice.get("message") or {}).get("content")
            or (choice.get("delta") or {}).get("content")
        )
        if isinstance(part, str):
            out.append(part)
    return out


class Governance:
    def __init__(self, database: Database, secret: bytes) -> None:
        self._secret = secret
        self._salts: dict[str, str] = {}
        self.content = ContentPolicy(database)
        self._writes: set[asyncio.Task[None]] = set()

    @classmethod
    async def load(cls, database: Database) -> Governance:
        return cls(database, await cache_salt_secret(await database.pool()))

    def cache_salt(self, tenant: str) -> str:
        salt = self._salts.get(tenant)
        if salt is None:
            salt = self._salts[tenant] = tenant_cache_salt(self._secret, tenant)
        return salt

    def salt(self, body: Any, tenant: str) -> None:
        if hasattr(body, "cache_salt"):
            body.cache_salt = self.cache_salt(tenant)

    def keep_response(self, request_id: str, tenant: str, body: Any, response: Any) -> None:
        """After a complete (non-streamed) answer: keep its content if the tenant opted in."""
        data = response.model_dump() if hasattr(response, "model_dump") else {}
        output = "".join(_texts(data.get("choices") or [])) or None
        self._later(self._keep(request_id, tenant, body, output))

    async def tap(
        self, request_id: str, tenant: str, body: Any, events: AsyncGenerator[str, None]
    ) -> AsyncGenerator[str, None]:
        """Pass a stream's events through unchanged, collecting its text if the tenant opted in."""
        collect = await self._retains(tenant)
        parts: list[str] = []
        try:
            async for event in events:
                if collect and event.startswith("data: {"):
                    try:
                        parts.extend(_texts(json.loads(event[6:]).get("choices") or []))
                    except ValueError:
                        pass
                yield event
        finally:
            # Close the inner stream now (it settles the request), not when it is collected.
            await events.aclose()
            if collect:
                self._later(self._keep(request_id, tenant, body, "".join(parts) or None))

    async def _retains(self, tenant: str) -> bool:
        try:
            return await self.content.retention_days(tenant) is not None
        except Exception as exc:  # the database is down: keep nothing rather than fail
            log.warning("content-retention lookup failed: %s", type(exc).__name__)
            return False

    async def _keep(self, request_id: str, tenant: str, body: Any, output: str | None) -> None:
        if await self._retains(tenant):
            await self.content.keep(request_id, tenant, prompt_of(body), output)

    def _later(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("keeping request content failed: %s", type(task.exception()).__name__)

    async def drain(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def retention_job(settings: Settings, database: Database) -> Retention:
    """The retention job the ledger's maintenance loop runs, from the settings."""
    return Retention(database, audit_days=settings.audit_retention_days, ledger_days=settings.ledger_retention_days)
