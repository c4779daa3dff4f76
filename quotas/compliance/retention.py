"""Retention: what is deleted, when, and the record that it was.

- Content (prompts and outputs) exists only for tenants that opted in; each row is deleted once
  it is older than its tenant's current period (a tenant that opts out loses all of it at the
  next run).
- The usage ledger is kept `ledger_days` (unset: for ever; it is the billing record).
- Audit records are kept `audit_days`, never fewer than the floor (90 days, enforced again by the
  database's `audit_purge`), and only the oldest prefix of the chain goes, so the rest verifies.

Every purge that deletes anything writes an audit record saying what and how much. The ledger's
maintenance loop runs `run_if_due` (hourly) in each ingress replica; a transaction-scoped
advisory lock lets one of them do the work. `agencyllm retention run` runs it by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agencyllm.quotas.audit import AuditRecord, insert_records, utc_now
from agencyllm.quotas.db import Database

log = logging.getLogger(__name__)

AUDIT_FLOOR_DAYS = 90
_LOCK_KEY = "agencyllm.retention"

# Kept prompts and outputs and stored Responses API responses (the tenant's content, for its
# retention period), and uploaded or batch output files past their own `expires_at`.
_PURGE_CONTENT_SQL = """
WITH gone AS (
    DELETE FROM request_content c USING tenants t
     WHERE t.id = c.tenant_id
       AND c.created_at < $1::timestamptz - make_interval(days => coalesce(t.content_retention_days, 0))
    RETURNING t.name AS tenant
), gone_responses AS (
    DELETE FROM stored_responses r USING tenants t
     WHERE t.id = r.tenant_id
       AND r.created_at < $1::timestamptz - make_interval(days => coalesce(t.content_retention_days, 0))
    RETURNING t.name AS tenant
), gone_files AS (
    DELETE FROM files f USING tenants t WHERE t.id = f.tenant_id AND f.expires_at < $1::timestamptz
    RETURNING t.name AS tenant
)
SELECT tenant, count(*) AS n
  FROM (SELECT tenant FROM gone UNION ALL SELECT tenant FROM gone_responses
        UNION ALL SELECT tenant FROM gone_files) AS g
 GROUP BY tenant ORDER BY tenant
"""
_PURGE_LEDGER_SQL = "DELETE FROM usage_ledger WHERE finished_at < $1"


@dataclass(frozen=True)
class RetentionReport:
    content: dict[str, int]
    ledger: int
    audit: int
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return "retention: another process is running it"
        content = sum(self.content.values())
        return f"retention: purged {content} content records, {self.ledger} ledger rows, {self.audit} audit records"


class Retention:
    def __init__(
        self,
        db: Database,
        *,
        audit_days: int = 365,
        ledger_days: int | None = None,
        audit_floor_days: int = AUDIT_FLOOR_DAYS,
        clock: Callable[[], datetime] = utc_now,
        interval: timedelta = timedelta(hours=1),
    ) -> None:
        floor = max(audit_floor_days, AUDIT_FLOOR_DAYS)
        if audit_days < floor:
            raise ValueError(f"audit records must be kept at least {floor} days (asked: {audit_days})")
        if ledger_days is not None and ledger_days < 1:
            raise ValueError("ledger retention must be at least 1 day")
        self._db = db
        self.audit_days = audit_days
        self.ledger_days = ledger_days
        self._clock = clock
        self._interval = interval
        self._last_run: datetime | None = None

    async def run_if_due(self) -> RetentionReport | None:
        now = self._clock()
        if self._last_run is not None and now - self._last_run < self._interval:
            return None
        self._last_run = now
        try:
            report = await self.run()
        except Exception as exc:  # never take the caller (the lease maintenance loop) down
            log.error("retention run failed: %s: %s", type(exc).__name__, exc)
            return None
        if not report.skipped and (report.ledger or report.audit or report.content):
            log.info(report.summary())
        return report

    async def run(self) -> RetentionReport:
        now = self._clock()
        pool = await self._db.pool()
        async with pool.acquire() as conn:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", _LOCK_KEY):
                    return RetentionReport({}, 0, 0, skipped=True)
                content = {r["tenant"]: r["n"] for r in await conn.fetch(_PURGE_CONTENT_SQL, now)}
                ledger = 0
                if self.ledger_days is not None:
                    status = await conn.execute(_PURGE_LEDGER_SQL, now - timedelta(days=self.ledger_days))
                    ledger = int(status.split()[-1])
                # Audit records last: their chain lock is held to commit (see migration 0002).
                records = [
                    _purge_record(now, "content.purge", "request_content", tenant, {"purged": n})
                    for tenant, n in content.items()
                ]
                if ledger:
                    records.append(
                        _purge_record(
                            now, "ledger.purge", "usage_ledger", None, {"purged": ledger, "keep_days": self.ledger_days}
                        )
                    )
                await insert_records(conn, records)
            purged = await conn.fetchrow("SELECT * FROM audit_purge($1, $2)", now, self.audit_days)
        return RetentionReport(content, ledger, int(purged["purged"] or 0))


def _purge_record(now: datetime, action: str, target: str, tenant: str | None, details: dict[str, Any]) -> AuditRecord:
    return AuditRecord(
        action=action,
        category="retention",
        outcome="success",
        actor_subject="system",
        actor_username="retention",
        tenant=tenant,
        target_type=target,
        target_id=tenant,
        at=now,
        details=details,
    )
