"""What is left of a tenant's (and a user's) quota in the current windows (`Ledger.remaining`)."""

from __future__ import annotations

from typing import Any

import asyncpg

from agencyllm.quotas.ledger.requests import AdmissionRefused
from agencyllm.quotas.ledger.windows import Windows
from agencyllm.quotas.models import TENANT_SCOPE


async def remaining_report(
    pool: asyncpg.Pool, tenant: str, subject: str | None, windows: Windows, timezone: str
) -> dict[str, Any]:
    """Limits, use and what is left per dimension, for the tenant and (given) the user."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        found = await conn.fetchrow("SELECT id, status FROM tenants WHERE name = $1", tenant)
        if found is None:
            raise AdmissionRefused("tenant_not_found", f"Unknown tenant '{tenant}'.")
        policies = {
            p["subject"]: p
            for p in await conn.fetch(
                "SELECT * FROM quota_policies WHERE tenant_id = $1 AND (subject IS NULL OR subject = $2)",
                found["id"],
                subject,
            )
        }
        counters = {
            c["subject"]: c
            for c in await conn.fetch(
                "SELECT * FROM quota_counters WHERE tenant_id = $1 AND subject IN ($2, $3)",
                found["id"],
                TENANT_SCOPE,
                subject or TENANT_SCOPE,
            )
        }
    tenant_policy = policies.get(None)
    user_policy = policies.get(subject) if subject else None

    def overriding(field: str) -> Any:  # the user's per-request field replaces the tenant's
        for policy in (user_policy, tenant_policy):
            if policy is not None and policy[field] is not None:
                return policy
        return None

    per_request = overriding("max_tokens_per_request")
    models_from = overriding("allowed_models")
    allowed = models_from["allowed_models"] if models_from else None
    result: dict[str, Any] = {
        "tenant": tenant,
        "status": found["status"],
        "timezone": timezone,
        "max_tokens_per_request": per_request and per_request["max_tokens_per_request"],
        "max_tokens_mode": per_request["max_tokens_mode"] if per_request else "cap",
        "allowed_models": list(allowed) if allowed is not None else None,
        "tenant_limits": _dimensions(tenant_policy, counters.get(TENANT_SCOPE), windows),
    }
    if subject:
        result["subject"] = subject
        result["user_limits"] = _dimensions(user_policy, counters.get(subject), windows)
    return result


def _dimensions(policy: Any, counter: Any, windows: Windows) -> dict[str, dict[str, Any]]:
    def current(key: str, value: str, now_key: object) -> int:
        return counter[value] if counter is not None and counter[key] >= now_key else 0

    used = {
        "tokens_per_day": (
            current("day_key", "day_charged", windows.day),
            current("day_key", "day_reserved", windows.day),
            "day",
        ),
        "tokens_per_month": (
            current("month_key", "month_charged", windows.month),
            current("month_key", "month_reserved", windows.month),
            "month",
        ),
        "requests_per_minute": (current("minute_key", "minute_requests", windows.minute), 0, "minute"),
        "max_concurrent_requests": (counter["in_flight"] if counter is not None else 0, 0, None),
    }
    dims: dict[str, dict[str, Any]] = {}
    for name, (charged, reserved, window) in used.items():
        limit = policy[name] if policy is not None else None
        dims[name] = {
            "limit": limit,
            "used": charged,
            "reserved": reserved,
            "remaining": None if limit is None else max(0, limit - charged - reserved),
            "resets_at": windows.ends(window).isoformat() if window else None,
        }
    return dims
