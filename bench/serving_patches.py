"""Experiment for `python -m bench.serving_bench --patched-ingress`: candidate cheap wins in the
ingress, measured without editing serving/. The subclass is shipped to the ingress replica by
value (cloudpickle), so the replica runs it instead of AgencyIngress.

1. API key lookup: one raw asyncpg statement on the ledger's pool instead of an ORM session
   (pool_pre_ping `SELECT 1`, BEGIN, SELECT key JOIN tenant, COMMIT).
2. Stream end: stop relaying at the engine's `[DONE]` instead of waiting for the engine stream to
   signal its end through the deployment handle, and settle without holding the response open
   (settlement already runs in its own shielded task).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import StreamingResponse

from agencyllm.auth.apikeys import looks_like_api_key, parse_key, verify_key_hash
from agencyllm.auth.principal import Principal, Role
from agencyllm.serving.identity import bearer_token, forbidden, unauthorized
from agencyllm.serving.ingress import AgencyIngress
from agencyllm.serving.streaming import StreamUsage, relay
from agencyllm.quotas import admin as store

log = logging.getLogger("agencyllm.bench.patched")
_DONE = "data: [DONE]\n\n"
_KEY_SQL = (
    "SELECT k.id, k.key_hash, k.kind, k.revoked_at, k.expires_at, k.owner_subject, k.owner_username,"
    " t.name AS tenant, t.status FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = $1"
)


class PatchedIngress(AgencyIngress):
    async def _authenticate(self, request) -> Principal:
        token = bearer_token(request.headers.get("authorization"))
        if token is None or not looks_like_api_key(token):
            return await super()._authenticate(request)
        parsed = parse_key(token)
        if parsed is None:
            raise unauthorized()
        pool = await self._database.pool()
        row = await pool.fetchrow(_KEY_SQL, parsed[0])
        if row is None or not verify_key_hash(token, row["key_hash"]) or row["revoked_at"] is not None:
            raise unauthorized()
        # (expiry and last_used_at bookkeeping left out of the experiment: same round-trip count
        # if folded into the statement as a conditional UPDATE … RETURNING.)
        platform_admin = row["kind"] == "service" and row["tenant"] == store.SYSTEM_TENANT
        roles = frozenset({Role.PLATFORM_ADMIN if platform_admin else Role.USER})
        if row["status"] != "active" and not platform_admin:
            raise forbidden(f"Tenant '{row['tenant']}' is suspended; ask your platform administrator.")
        return Principal(subject=row["owner_subject"], username=row["owner_username"], client_id=None,
                         tenant=row["tenant"], roles=roles, auth_method="api_key", key_id=str(row["id"]))

    async def _generate(self, body, method, admitted, client_wants_usage):
        if not getattr(body, "stream", False):
            return await super()._generate(body, method, admitted, client_wants_usage)
        response = await super()._generate(body, method, admitted, client_wants_usage)
        if not isinstance(response, StreamingResponse):
            return response
        original = response.body_iterator
        background = getattr(self, "_bench_background", None)
        if background is None:
            background = self._bench_background = set()

        async def drain() -> None:
            async for _ in original:  # nothing follows [DONE]: waits for the engine's end + settle
                pass

        # Wrap the shipped generator: its own `finally` (settle, status ok) still runs, but in a
        # background task after the client has its `[DONE]` and the response is closed.
        async def events():
            async for event in original:
                yield event
                if event == _DONE:
                    task = asyncio.ensure_future(drain())
                    background.add(task)
                    task.add_done_callback(background.discard)
                    return

        response.body_iterator = events()
        return response


def install() -> None:
    """Make build_application use PatchedIngress and ship it by value to the replica."""
    import sys

    from ray import cloudpickle

    from agencyllm.serving import app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    app.AgencyIngress = PatchedIngress
