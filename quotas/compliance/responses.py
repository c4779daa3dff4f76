"""Stored Responses API responses (`store`), in Postgres so any ingress replica can continue a
conversation and a restart loses nothing. Each belongs to its tenant and its caller: every read
and delete is by id *and* both, so another user's or tenant's id is simply not found. Only tenants
that keep content store anything (the insert re-checks the opt-in), and retention purges them
with the tenant's other content (retention.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# How far back `previous_response_id` is followed; a longer chain is refused (the caller's
# context would not fit any model long before this).
MAX_CHAIN = 10_000

_SAVE_SQL = """
INSERT INTO stored_responses (id, tenant_id, subject, previous_id, input_items, response)
SELECT $1, id, $3, $4, $5::jsonb, $6 FROM tenants
 WHERE name = $2 AND content_retention_days IS NOT NULL
"""
_OWNED = "r.id = $1 AND r.subject = $3 AND r.tenant_id = (SELECT id FROM tenants WHERE name = $2)"
_GET_SQL = f"SELECT r.input_items, r.response FROM stored_responses r WHERE {_OWNED}"
_DELETE_SQL = f"DELETE FROM stored_responses r WHERE {_OWNED}"
# From `$1` back to the first response of its conversation, newest first, the caller's only.
_CHAIN_SQL = f"""
WITH RECURSIVE chain AS (
    SELECT r.id, r.previous_id, r.input_items, r.response, 1 AS depth, r.tenant_id, r.subject
      FROM stored_responses r WHERE {_OWNED}
    UNION ALL
    SELECT p.id, p.previous_id, p.input_items, p.response, c.depth + 1, p.tenant_id, p.subject
      FROM chain c JOIN stored_responses p
        ON p.id = c.previous_id AND p.tenant_id = c.tenant_id AND p.subject = c.subject
     WHERE c.depth <= {MAX_CHAIN}
)
SELECT id, input_items, response, depth FROM chain ORDER BY depth DESC
"""


class ChainTooLong(ValueError):
    pass


@dataclass(frozen=True)
class Stored:
    input_items: list[dict[str, Any]]
    response: dict[str, Any]


class ResponseStore:
    def __init__(self, database: Any) -> None:
        self._database = database  # a quotas.db.Database

    async def save(
        self,
        response_id: str,
        tenant: str,
        subject: str,
        previous_id: str | None,
        input_items: list[dict[str, Any]],
        response: dict[str, Any],
    ) -> bool:
        """Store one response; False where the tenant keeps no content (nothing is written)."""
        pool = await self._database.pool()
        status: str = await pool.execute(
            _SAVE_SQL, response_id, tenant, subject, previous_id, json.dumps(input_items), json.dumps(response)
        )
        return status.endswith(" 1")

    async def get(self, response_id: str, tenant: str, subject: str) -> Stored | None:
        pool = await self._database.pool()
        row = await pool.fetchrow(_GET_SQL, response_id, tenant, subject)
        return None if row is None else Stored(json.loads(row["input_items"]), json.loads(row["response"]))

    async def delete(self, response_id: str, tenant: str, subject: str) -> bool:
        pool = await self._database.pool()
        status: str = await pool.execute(_DELETE_SQL, response_id, tenant, subject)
        return status.endswith(" 1")

    async def conversation(self, response_id: str, tenant: str, subject: str) -> list[Stored] | None:
        """The stored responses of `response_id`'s conversation, oldest first, ending with it;
        None if it is not the caller's. Raises ChainTooLong past MAX_CHAIN responses."""
        pool = await self._database.pool()
        rows = await pool.fetch(_CHAIN_SQL, response_id, tenant, subject)
        if not rows:
            return None
        if rows[0]["depth"] > MAX_CHAIN:
            raise ChainTooLong(f"the conversation is longer than {MAX_CHAIN} responses")
        return [Stored(json.loads(r["input_items"]), json.loads(r["response"])) for r in rows]
