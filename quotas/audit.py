"""The audit trail: writing records, aggregating floods, verifying the chain, exporting it.

Records live in `audit_events`, append-only and hash-chained by the database itself (migration
0002): every insert, from any process, gets the next `seq`, the previous record's hash and its
own. Model-request records are written by the settlement statement (quotas/ledger/); admin
changes by the admin store in the change's own transaction; authentication failures and quota
refusals go through `AuditLog`, which folds a flood into one record per source, reason and
minute. Records hold who, what, when, where, source and outcome — never prompts or outputs.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from agencyllm.quotas.db import Database

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# A flood from many addresses at once is folded further: past this many distinct buckets in
# one minute, new sources count under one overflow bucket.
MAX_BUCKETS_PER_MINUTE = 1000
OVERFLOW_SOURCE = "(other sources)"

# The caller's network address for records written deeper in the call (set per HTTP request
# by serving/gateway/governance.py's middleware; contextvars follow the request's task).
request_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("agencyllm_request_source", default=None)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AuditRecord:
    action: str
    category: str
    outcome: str
    actor_subject: str
    target_type: str
    at: datetime
    actor_username: str | None = None
    actor_client_id: str | None = None
    actor_key_id: str | None = None
    tenant: str | None = None
    source: str | None = None
    request_id: str | None = None
    target_id: str | None = None
    details: dict[str, Any] | None = None


_COLUMNS = (
    "at",
    "category",
    "action",
    "outcome",
    "actor_subject",
    "actor_username",
    "actor_client_id",
    "actor_key_id",
    "tenant",
    "source",
    "request_id",
    "target_type",
    "target_id",
    "details",
)
_INSERT_SQL = (
    f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 1))})"
)


@dataclass(frozen=True)
class Actor:
    """Who did something, as an audit record names them (a request's caller)."""

    subject: str
    username: str | None = None
    client_id: str | None = None
    key_id: str | None = None


def data_event(
    actor: Actor, action: str, tenant: str, target_type: str, target_id: str, details: dict[str, Any] | None = None
) -> AuditRecord:
    """A caller's change to their own data (a file uploaded or deleted, a batch created or
    cancelled), written in the change's own transaction. Never the data itself."""
    return AuditRecord(
        action=action,
        category="admin",
        outcome="success",
        actor_subject=actor.subject,
        actor_username=actor.username,
        actor_client_id=actor.client_id,
        actor_key_id=actor.key_id,
        tenant=tenant,
        source=request_source.get(),
        target_type=target_type,
        target_id=target_id,
        at=utc_now(),
        details=details,
    )


async def insert_records(conn: asyncpg.Connection | asyncpg.Pool, records: list[AuditRecord]) -> None:
    if not records:
        return
    rows = [
        tuple(
            json.dumps(getattr(r, c)) if c == "details" and r.details is not None else getattr(r, c) for c in _COLUMNS
        )
        for r in records
    ]
    await conn.executemany(_INSERT_SQL, rows)


@dataclass
class _Bucket:
    count: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    sample: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Aggregated events: authentication failures and quota refusals. `count` is synchronous and
    costs a dict update; buckets of a minute that has ended are written by a background task
    (started on first use) and by `flush()`/`aclose()`. A flood of N events in a minute from
    one source for one reason is one record with `details.count = N`."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utc_now, flush_interval: float = 5.0) -> None:
        self._db = db
        self._clock = clock
        self._flush_interval = flush_interval
        self._buckets: dict[tuple[Any, ...], _Bucket] = {}
        self._per_minute: dict[datetime, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def auth_failure(self, reason: str, *, source: str | None = None, subject: str | None = None) -> None:
        """One refused credential. Only the reason and where it came from are kept (never the
        credential itself); `subject` when the token named one."""
        self._count(
            "auth", "auth.failure", "failure", reason, source, tenant=None, subject=subject or "anonymous", model=None
        )

    def quota_refusal(
        self,
        reason: str,
        *,
        tenant: str,
        subject: str,
        username: str | None,
        key_id: str | None,
        model: str,
        source: str | None = None,
    ) -> None:
        self._count(
            "quota",
            "quota.refusal",
            "refused",
            reason,
            source,
            tenant=tenant,
            subject=subject,
            model=model,
            username=username,
            key_id=key_id,
        )

    def _count(
        self,
        category: str,
        action: str,
        outcome: str,
        reason: str,
        source: str | None,
        *,
        tenant: str | None,
        subject: str,
        model: str | None,
        username: str | None = None,
        key_id: str | None = None,
    ) -> None:
        now = self._clock()
        minute = now.astimezone(UTC).replace(second=0, microsecond=0)
        source = source if source is not None else request_source.get()
        key = (minute, action, reason, source, tenant, subject, model)
        bucket = self._buckets.get(key)
        if bucket is None:
            if self._per_minute.get(minute, 0) >= MAX_BUCKETS_PER_MINUTE:
                key = (minute, action, reason, OVERFLOW_SOURCE, None, "anonymous", None)
                bucket = self._buckets.get(key)
            if bucket is None:
                self._per_minute[minute] = self._per_minute.get(minute, 0) + 1
                bucket = self._buckets[key] = _Bucket(
                    sample={"category": category, "outcome": outcome, "username": username, "key_id": key_id}
                )
        bucket.count += 1
        bucket.first_at = bucket.first_at or now
        bucket.last_at = now
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while self._buckets:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except (OSError, asyncpg.PostgresError) as exc:  # kept; retried next round
                log.warning("writing aggregated audit records failed: %s", exc)

    @property
    def pending(self) -> int:
        return len(self._buckets)

    async def flush(self, *, everything: bool = False) -> int:
        """Write the buckets of minutes that have ended (all of them with `everything`)."""
        async with self._lock:
            current = self._clock().astimezone(UTC).replace(second=0, microsecond=0)
            ready = [k for k in self._buckets if everything or k[0] < current]
            if not ready:
                return 0
            records = [self._record(k, self._buckets[k]) for k in ready]
            pool = await self._db.pool()
            await insert_records(pool, records)
            for k in ready:
                del self._buckets[k]
            for minute in [m for m in self._per_minute if everything or m < current]:
                del self._per_minute[minute]
            return len(records)

    @staticmethod
    def _record(key: tuple[Any, ...], bucket: _Bucket) -> AuditRecord:
        minute, action, reason, source, tenant, subject, model = key
        details: dict[str, Any] = {
            "reason": reason,
            "count": bucket.count,
            "window_start": minute.isoformat(),
            "window_seconds": 60,
            "first_at": bucket.first_at.isoformat() if bucket.first_at else None,
            "last_at": bucket.last_at.isoformat() if bucket.last_at else None,
        }
        return AuditRecord(
            action=action,
            category=bucket.sample["category"],
            outcome=bucket.sample["outcome"],
            actor_subject=subject,
            actor_username=bucket.sample["username"],
            actor_key_id=bucket.sample["key_id"],
            tenant=tenant,
            source=source,
            target_type="model" if model else "api",
            target_id=model,
            at=bucket.last_at or minute,
            details=details,
        )

    async def aclose(self) -> None:
        try:
            await self.flush(everything=True)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("could not write %d aggregated audit records at shutdown: %s", len(self._buckets), exc)
        if self._task is not None:
            self._task.cancel()


# --- verification -------------------------------------------------------------------------------

_WALK_SQL = """
SELECT seq, id, at, action, prev_hash, hash, details, audit_canonical(a) AS canonical
FROM audit_events a ORDER BY seq
"""


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None
    problem: str | None = None
    bad_seq: int | None = None

    def summary(self) -> str:
        if self.ok:
            if not self.records:
                return "audit chain OK: no records"
            return (
                f"audit chain OK: {self.records} records, seq {self.first_seq}..{self.last_seq}, head {self.head_hash}"
            )
        return f"audit chain BROKEN at seq {self.bad_seq}: {self.problem}"


def record_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


async def verify_chain(conn: asyncpg.Connection) -> Verification:
    """Walk every record in seq order and recompute its hash: the first record that was modified
    (hash mismatch), deleted (a gap, or a prefix gone without a purge record naming it),
    reordered (prev_hash not the hash of the record before) or cut from the end (the chain's
    head says more) is named. Run it as the audit reader role."""
    head = await conn.fetchrow("SELECT seq, hash FROM audit_chain_head WHERE id = 1")
    purges: dict[int, str] = {}
    previous: Any = None
    first: Any = None
    count = 0

    def broken(seq: int, problem: str) -> Verification:
        return Verification(
            False, count, first["seq"] if first else None, previous["seq"] if previous else None, None, problem, seq
        )

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(_WALK_SQL, prefetch=1000):
            if row["action"] == "audit.purge" and row["details"]:
                details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
                purges[int(details["through_seq"])] = details["through_hash"]
            if record_hash(row["canonical"]) != row["hash"]:
                return broken(
                    row["seq"], "record was modified or moved (its hash does not match its content and position)"
                )
            if previous is None:
                first = row  # seq > 1: older records were purged; a purge record must vouch
            else:
                if row["seq"] != previous["seq"] + 1:
                    return broken(
                        previous["seq"] + 1,
                        f"record deleted (seq {previous['seq'] + 1} is missing; next is {row['seq']})",
                    )
                if row["prev_hash"] != previous["hash"]:
                    return broken(
                        row["seq"],
                        f"records reordered or replaced (prev_hash is not the hash of seq {previous['seq']})",
                    )
            previous = row
            count += 1
    if first is not None and first["seq"] != 1:
        vouched = purges.get(first["seq"] - 1)
        if vouched != first["prev_hash"]:
            return broken(first["seq"] - 1, f"records before seq {first['seq']} deleted without a purge record")
    elif first is not None and first["prev_hash"] != GENESIS_HASH:
        return broken(first["seq"], "first record does not start the chain")
    if head is not None and previous is not None and head["seq"] != previous["seq"]:
        return broken(
            previous["seq"] + 1, f"records after seq {previous['seq']} deleted (chain head is seq {head['seq']})"
        )
    if head is not None and previous is None and head["seq"] != 0:
        return broken(1, f"every record deleted (chain head is seq {head['seq']})")
    if head is not None and previous is not None and head["hash"] != previous["hash"]:
        return broken(previous["seq"], "last record does not match the chain head")
    return Verification(
        True,
        count,
        first["seq"] if first else None,
        previous["seq"] if previous else None,
        previous["hash"] if previous else None,
    )


# --- export -------------------------------------------------------------------------------------

_EXPORT_SQL = """
SELECT seq, at, category, action, outcome, actor_subject, actor_username, actor_client_id,
       actor_key_id, tenant, source, request_id, target_type, target_id, before, after, details,
       prev_hash, hash
FROM audit_events WHERE at >= $1 AND at < $2 AND ($3::text IS NULL OR tenant = $3)
ORDER BY seq
"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def export_records(
    conn: asyncpg.Connection, since: datetime, until: datetime, tenant: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Records with since <= at < until in chain order, as plain JSON-ready dicts (SIEM lines)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(_EXPORT_SQL, since, until, tenant, prefetch=1000):
            item = dict(row)
            item["at"] = row["at"].astimezone(UTC).isoformat().replace("+00:00", "Z")
            for name in ("before", "after", "details"):
                item[name] = _json(item[name])
            yield item


def parse_since(value: str, now: datetime) -> datetime:
    """`2026-12-01`, an ISO date-time, or a span back from now: `24h`, `7d`, `30m`."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if value and value[-1] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
