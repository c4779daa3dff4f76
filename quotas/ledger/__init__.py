"""Admission (reserve) and settlement against the quota counters in Postgres.

Each reserve and settle is one call of a plpgsql function (migration 0001) in one transaction,
over the raw asyncpg pool; concurrent calls share a statement (quotas/ledger/batching.py), so a request
costs at most one round trip each way. Semantics and guarantees: docs/quotas.md."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from time import perf_counter
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from agencyllm.quotas.audit import AuditLog, request_source, utc_now
from agencyllm.quotas.compliance.retention import Retention
from agencyllm.quotas.db import Database, availability, database_unavailable
from agencyllm.quotas.ledger.batching import Batcher
from agencyllm.quotas.ledger.metrics import QuotaMetrics, quota_metrics
from agencyllm.quotas.models import ENDPOINTS, TENANT_SCOPE, USAGE_STATUSES

log = logging.getLogger(__name__)

REAP_BATCH = 500


@dataclass(frozen=True)
class ReservationRequest:
    request_id: str
    tenant: str
    subject: str
    username: str | None
    key_id: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    max_tokens: int | None
    context_length: int
    # For the audit record: the OIDC client (azp) and the caller's network address.
    client_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Reservation:
    id: int
    request_id: str
    tenant_id: UUID
    subject: str
    max_tokens: int  # effective: after the per-request cap and the context length
    reserved_tokens: int  # prompt_tokens + max_tokens
    headers: dict[str, str]
    tenant: str = ""
    model: str = ""
    client_id: str | None = None
    source: str | None = None


class AdmissionRefused(Exception):
    """A request the quotas do not let in. `reason` says why: `tenant_not_found`,
    `tenant_suspended`, `model_not_allowed`, `max_tokens_over_limit`, `context_length_exceeded`,
    or the limit reached (`tokens_per_day`, `tokens_per_month`, `requests_per_minute`,
    `max_concurrent_requests`). `retry_after`: seconds until the window reopens, when known;
    `headers`: the limit's `x-ratelimit-*` facts. serving/gateway/errors.py turns it into an answer."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Windows:
    """The calendar windows containing `now` in the quota time zone, and when each ends."""

    now: datetime
    day: date
    month: date
    minute: datetime
    day_ends: datetime
    month_ends: datetime
    minute_ends: datetime

    @classmethod
    def at(cls, now: datetime, tz: ZoneInfo) -> Windows:
        if now.tzinfo is None:
            raise ValueError("the ledger clock must return aware datetimes")
        local = now.astimezone(tz)
        day = local.date()
        month = day.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        minute = now.astimezone(UTC).replace(second=0, microsecond=0)
        return cls(
            now=now,
            day=day,
            month=month,
            minute=minute,
            day_ends=_local_midnight(day + timedelta(days=1), tz),
            month_ends=_local_midnight(next_month, tz),
            minute_ends=minute + timedelta(minutes=1),
        )

    def ends(self, window: str) -> datetime:
        return {"day": self.day_ends, "month": self.month_ends, "minute": self.minute_ends}[window]

    def seconds_left(self, window: str) -> float:
        return (self.ends(window) - self.now).total_seconds()


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `59s`, `6m0s`, `3h2m1s`."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_DIMENSION_WINDOW = {
    "tokens_per_day": "day",
    "tokens_per_month": "month",
    "requests_per_minute": "minute",
    "max_concurrent_requests": None,
}
_DIMENSION_TEXT = {
    "tokens_per_day": "daily token budget",
    "tokens_per_month": "monthly token budget",
    "requests_per_minute": "requests-per-minute limit",
    "max_concurrent_requests": "concurrent-request limit",
}

_RESERVE_SQL = "SELECT * FROM quota_reserve($1, $2, $3, $4, $5::uuid, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
# A batch calls the same function once per row, in array order (sorted by tenant and subject:
# every batch then takes counter-row locks in one global order, so batches cannot deadlock).
_RESERVE_BATCH_SQL = (
    "SELECT r.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[],"
    " $6::text[], $7::text[], $8::int[], $9::int[], $10::int[]) WITH ORDINALITY"
    " AS a(request_id, tenant, subject, username, key_id, model, endpoint, prompt, max_tokens,"
    " context, n)"
    " CROSS JOIN LATERAL quota_reserve(a.request_id, a.tenant, a.subject, a.username, a.key_id,"
    " a.model, a.endpoint, a.prompt, a.max_tokens, a.context, $11, $12, $13, $14, $15) AS r"
    " ORDER BY a.n"
)
# Settlement also writes each request's audit record, in the same statement (migration 0002).
_SETTLE_SQL = (
    "SELECT charged FROM quota_settle_many(ARRAY[$1::bigint], ARRAY[$2::int], ARRAY[$3::int],"
    " ARRAY[$4::text], ARRAY[$5::float8], ARRAY[$6::float8], $7, ARRAY[$8::text], ARRAY[$9::text])"
)
_SETTLE_BATCH_SQL = (
    "SELECT charged FROM quota_settle_many($1::bigint[], $2::int[], $3::int[], $4::text[],"
    " $5::float8[], $6::float8[], $7, $8::text[], $9::text[]) ORDER BY n"
)
_RENEW_SQL = "UPDATE quota_reservations SET lease_expires_at = $1 WHERE id = ANY($2::bigint[])"
_REAP_SQL = "SELECT quota_reap($1, $2)"
# Batches in flight per Ledger and per kind (reserve, settle): enough to keep a 2-4 core
# Postgres busy; more only lengthens lock queues on a hot tenant.
MAX_BATCHES_IN_FLIGHT = 3


@dataclass(frozen=True)
class _Settlement:
    reservation: Reservation
    prompt_tokens: int
    completion_tokens: int
    status: str
    ttft_ms: float | None
    latency_ms: float


def _reserve_params(req: ReservationRequest) -> tuple:
    return (
        req.request_id,
        req.tenant,
        req.subject,
        req.username,
        req.key_id,
        req.model,
        req.endpoint,
        req.prompt_tokens,
        req.max_tokens,
        req.context_length,
    )


def _window_params(windows: Windows, lease: timedelta) -> tuple:
    return windows.now, windows.day, windows.month, windows.minute, windows.now + lease


_Admission = tuple[Any, "Windows", ReservationRequest]


def _reservation(req: ReservationRequest, row: Any, windows: Windows) -> Reservation:
    return Reservation(
        id=row["reservation_id"],
        request_id=req.request_id,
        tenant_id=row["tenant"],
        subject=req.subject,
        max_tokens=row["granted_max_tokens"],
        reserved_tokens=row["reserved"],
        headers=_admission_headers(row, windows),
        tenant=req.tenant,
        model=req.model,
        client_id=req.client_id,
        source=req.source,
    )


def _lock_order(keys: list[tuple[str, str]]) -> list[int]:
    return sorted(range(len(keys)), key=keys.__getitem__)


class Ledger:
    def __init__(
        self,
        db: Database,
        *,
        timezone: str = "UTC",
        lease_seconds: int = 120,
        clock: Callable[[], datetime] = utc_now,
        metrics: QuotaMetrics | None = None,
        audit: AuditLog | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._db = db
        self.timezone = ZoneInfo(timezone)
        self.lease = timedelta(seconds=lease_seconds)
        self._clock = clock
        self._metrics = metrics or quota_metrics()
        self.audit = audit or AuditLog(db, clock=clock)
        self._retention = retention  # run from maintain()
        self._background: set[asyncio.Task[None]] = set()
        self._open: dict[int, Reservation] = {}  # admitted here, not yet settled: leases to renew
        # Per tenant: a flooding tenant's reservations wait on its own counter row, not others'.
        self._reserver = Batcher(
            self._reserve_batch,
            self._reserve_one,
            max_in_flight=MAX_BATCHES_IN_FLIGHT,
            on_abandoned=self._release_abandoned,
            drop_cancelled=True,
            partition=lambda req: req.tenant,
        )
        self._settler = Batcher(self._settle_batch, self._settle_one, max_in_flight=MAX_BATCHES_IN_FLIGHT)

    async def reserve(self, req: ReservationRequest) -> Reservation:
        """Admit or refuse (AdmissionRefused). If the caller is cancelled while the admission is
        in flight, a reservation made anyway is released at once, not left to the reaper.
        request_id must be new (asyncpg.UniqueViolationError otherwise)."""
        if req.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {req.endpoint!r}")
        if not req.subject:
            raise ValueError("subject must be non-empty")
        if req.prompt_tokens < 0 or (req.max_tokens is not None and req.max_tokens < 0):
            raise ValueError("token counts must be >= 0")
        if req.key_id is not None:
            UUID(req.key_id)  # raises ValueError; a bad id must not fail a whole batch
        if req.source is None and (source := request_source.get()) is not None:
            req = replace(req, source=source)
        started = perf_counter()
        row, windows, _ = await self._reserver.submit(req)
        self._metrics.reservation_seconds(perf_counter() - started)
        if row["outcome"] != "ok":
            self._metrics.refused(req.tenant, req.model, row["outcome"])
            self.audit.quota_refusal(
                row["outcome"],
                tenant=req.tenant,
                subject=req.subject,
                username=req.username,
                key_id=req.key_id,
                model=req.model,
                source=req.source,
            )
            raise self._refusal(req, row, windows)
        self._metrics.admitted(req.tenant, req.model)
        reservation = _reservation(req, row, windows)
        self._open[reservation.id] = reservation
        return reservation

    def _release_abandoned(self, result: tuple[Any, Windows, ReservationRequest]) -> None:
        """Admitted after its caller went away: free the slot and budget now, not at lease end."""
        row, windows, req = result
        if row["outcome"] != "ok":
            return
        self._metrics.admitted(req.tenant, req.model)
        release = asyncio.ensure_future(
            self.settle(
                _reservation(req, row, windows),
                prompt_tokens=0,
                completion_tokens=0,
                status="cancelled",
                ttft_ms=None,
                latency_ms=0.0,
            )
        )
        self._background.add(release)
        release.add_done_callback(self._background.discard)

    async def _reserve_one(self, req: ReservationRequest) -> _Admission:
        windows = Windows.at(self._clock(), self.timezone)
        pool = await self._db.pool()
        row = await pool.fetchrow(_RESERVE_SQL, *_reserve_params(req), *_window_params(windows, self.lease))
        return row, windows, req

    async def _reserve_batch(self, reqs: list[ReservationRequest]) -> list[_Admission]:
        order = _lock_order([(r.tenant, r.subject) for r in reqs])
        columns = list(zip(*(_reserve_params(reqs[i]) for i in order), strict=True))
        windows = Windows.at(self._clock(), self.timezone)
        pool = await self._db.pool()
        rows = await pool.fetch(_RESERVE_BATCH_SQL, *columns, *_window_params(windows, self.lease))
        results: list[_Admission] = [None] * len(reqs)  # type: ignore[list-item]
        for position, row in zip(order, rows, strict=True):
            results[position] = (row, windows, reqs[position])
        return results

    def _refusal(self, req: ReservationRequest, row: Any, windows: Windows) -> AdmissionRefused:
        outcome, limit = row["outcome"], row["limit_value"]
        if outcome == "unknown_tenant":
            return AdmissionRefused("tenant_not_found", f"Unknown tenant '{req.tenant}'.")
        if outcome == "suspended":
            return AdmissionRefused("tenant_suspended", f"Tenant '{req.tenant}' is suspended.")
        if outcome == "model_not_allowed":
            return AdmissionRefused(
                "model_not_allowed", f"Model '{req.model}' is not allowed for your account.", param="model"
            )
        if outcome == "max_tokens_over_cap":
            return AdmissionRefused(
                "max_tokens_over_limit", f"max_tokens must be at most {limit} for your account.", param="max_tokens"
            )
        if outcome == "context_length_exceeded":
            return AdmissionRefused(
                "context_length_exceeded",
                f"The prompt ({req.prompt_tokens} tokens) leaves no room in the model's context of {limit} tokens.",
                param="messages",
            )
        whose = f"tenant '{req.tenant}'" if row["scope"] == "tenant" else "your user"
        what = f"The {_DIMENSION_TEXT[outcome]} of {whose} ({limit})"
        window = _DIMENSION_WINDOW[outcome]
        retry_after = windows.seconds_left(window) if window else None
        headers: dict[str, str] = {}
        if outcome.startswith("tokens_"):
            need = row["reserved"]
            message = (
                f"{what} has too little left for this request, which reserves {need} tokens "
                "(prompt + max_tokens). Lower max_tokens or retry when the window resets."
            )
            headers["x-ratelimit-limit-tokens"] = str(limit)
            headers["x-ratelimit-reset-tokens"] = _duration(retry_after or 0)
        else:
            message = f"{what} is reached. Retry later."
            if window:
                headers["x-ratelimit-limit-requests"] = str(limit)
                headers["x-ratelimit-remaining-requests"] = "0"
                headers["x-ratelimit-reset-requests"] = _duration(retry_after or 0)
        return AdmissionRefused(outcome, message, retry_after=retry_after, headers=headers)

    async def settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        status: str,
        ttft_ms: float | None,
        latency_ms: float,
    ) -> None:
        """Charge, free the slot, write the ledger row; idempotent. The call runs in a batch task:
        a caller cancelled while waiting (client disconnect) does not abort it."""
        if status not in USAGE_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self._open.pop(reservation.id, None)
        await self._settler.submit(
            _Settlement(reservation, prompt_tokens, completion_tokens, status, ttft_ms, latency_ms)
        )

    def _settled(self, s: _Settlement, charged: int | None) -> int | None:
        if charged is not None:  # None: settled before (idempotent no-op)
            used = s.prompt_tokens + s.completion_tokens
            if used > s.reservation.reserved_tokens:
                log.warning(
                    "request %s used %d tokens, more than the %d reserved; charged %d",
                    s.reservation.request_id,
                    used,
                    s.reservation.reserved_tokens,
                    charged,
                )
            self._metrics.tokens_charged(s.reservation.tenant, s.reservation.model, charged)
            self._metrics.request_finished(s.reservation.tenant, s.reservation.model, s.ttft_ms, s.latency_ms)
        return charged

    async def _settle_one(self, s: _Settlement) -> int | None:
        pool = await self._db.pool()
        charged = await pool.fetchval(
            _SETTLE_SQL,
            s.reservation.id,
            s.prompt_tokens,
            s.completion_tokens,
            s.status,
            s.ttft_ms,
            s.latency_ms,
            self._clock(),
            s.reservation.client_id,
            s.reservation.source,
        )
        return self._settled(s, charged)

    async def _settle_batch(self, items: list[_Settlement]) -> list[int | None]:
        order = _lock_order([(s.reservation.tenant, s.reservation.subject) for s in items])
        columns = list(
            zip(
                *(
                    (
                        items[i].reservation.id,
                        items[i].prompt_tokens,
                        items[i].completion_tokens,
                        items[i].status,
                        items[i].ttft_ms,
                        items[i].latency_ms,
                    )
                    for i in order
                ),
                strict=True,
            )
        )
        audit = list(zip(*((items[i].reservation.client_id, items[i].reservation.source) for i in order), strict=True))
        pool = await self._db.pool()
        rows = await pool.fetch(_SETTLE_BATCH_SQL, *columns, self._clock(), *audit)
        results: list[int | None] = [None] * len(items)
        for position, row in zip(order, rows, strict=True):
            results[position] = self._settled(items[position], row[0])
        return results

    async def renew(self, reservations: Iterable[Reservation]) -> None:
        ids = [r.id for r in reservations]
        if ids:
            pool = await self._db.pool()
            await pool.execute(_RENEW_SQL, self._clock() + self.lease, ids)

    @property
    def open_reservations(self) -> list[Reservation]:
        return list(self._open.values())

    async def maintain(self, *, interval: float | None = None) -> None:
        """Run for the life of the ingress (as a background task): renew the leases of this
        process' open reservations and reap other processes' expired ones, every `interval`
        seconds (default: a third of the lease, so two missed rounds still keep a lease)."""
        period = interval if interval is not None else self.lease.total_seconds() / 3
        while True:
            try:
                await self.renew(self.open_reservations)
                if reaped := await self.reap():
                    log.info("reaped %d expired reservations", reaped)
                await self.audit.flush()
                if self._retention is not None:
                    await self._retention.run_if_due()
                availability.ok()
            except Exception as exc:  # keep going through database outages, whatever they raise
                if database_unavailable(exc):
                    availability.failed(exc)  # said once per outage, not once per round
                else:
                    log.warning("quota lease maintenance failed: %s", type(exc).__name__)
            await asyncio.sleep(period)

    async def reap(self) -> int:
        """Settle every reservation whose lease ran out, charging it in full (its ingress died
        and may have streamed up to max_tokens). Returns how many were settled."""
        pool = await self._db.pool()
        total = 0
        while True:
            count = await pool.fetchval(_REAP_SQL, self._clock(), REAP_BATCH)
            total += count
            if count < REAP_BATCH:
                return total

    async def remaining(self, tenant: str, subject: str | None = None) -> dict[str, Any]:
        """Limits, use and what is left per dimension, for the tenant and (given) the user."""
        windows = Windows.at(self._clock(), self.timezone)
        pool = await self._db.pool()
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
            "timezone": self.timezone.key,
            "max_tokens_per_request": per_request and per_request["max_tokens_per_request"],
            "max_tokens_mode": per_request["max_tokens_mode"] if per_request else "cap",
            "allowed_models": list(allowed) if allowed is not None else None,
            "tenant_limits": _dimensions(tenant_policy, counters.get(TENANT_SCOPE), windows),
        }
        if subject:
            result["subject"] = subject
            result["user_limits"] = _dimensions(user_policy, counters.get(subject), windows)
        return result


def _admission_headers(row: Any, windows: Windows) -> dict[str, str]:
    headers: dict[str, str] = {}
    if row["tok_limit"] is not None:
        headers["x-ratelimit-limit-tokens"] = str(row["tok_limit"])
        headers["x-ratelimit-remaining-tokens"] = str(max(0, row["tok_remaining"]))
        headers["x-ratelimit-reset-tokens"] = _duration(windows.seconds_left(row["tok_window"]))
    if row["req_limit"] is not None:
        headers["x-ratelimit-limit-requests"] = str(row["req_limit"])
        headers["x-ratelimit-remaining-requests"] = str(max(0, row["req_remaining"]))
        headers["x-ratelimit-reset-requests"] = _duration(windows.seconds_left("minute"))
    return headers


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
