"""The `Ledger`: admission (reserve) and settlement against the quota counters in Postgres.

Each reserve and settle is one call of a plpgsql function (migration 0001) in one transaction,
over the raw asyncpg pool; concurrent calls share a statement (quotas/ledger/batching.py), so a request
costs at most one round trip each way. Semantics and guarantees: docs/quotas.md."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from time import perf_counter
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from agencyllm.quotas.audit import AuditLog, request_source, utc_now
from agencyllm.quotas.compliance.retention import Retention
from agencyllm.quotas.db import Database, availability, database_unavailable
from agencyllm.quotas.ledger.batching import Batcher
from agencyllm.quotas.ledger.metrics import QuotaMetrics, quota_metrics
from agencyllm.quotas.ledger.refusals import admission_headers, refusal
from agencyllm.quotas.ledger.remaining import remaining_report
from agencyllm.quotas.ledger.requests import Reservation, ReservationRequest
from agencyllm.quotas.ledger.windows import Windows
from agencyllm.quotas.models import ENDPOINTS, USAGE_STATUSES

log = logging.getLogger(__name__)

REAP_BATCH = 500


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
# Rows a settlement holds right now are skipped, not waited for: they are about to go, and a
# renewal that waited could deadlock with the settlement's own locks (seen under load).
_RENEW_SQL = (
    "UPDATE quota_reservations SET lease_expires_at = $1 WHERE id IN"
    " (SELECT id FROM quota_reservations WHERE id = ANY($2::bigint[]) ORDER BY id FOR UPDATE SKIP LOCKED)"
)
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


def _reserve_params(req: ReservationRequest) -> tuple[object, ...]:
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


def _window_params(windows: Windows, lease: timedelta) -> tuple[object, ...]:
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
        headers=admission_headers(row, windows),
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
            raise refusal(req, row, windows)
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
            count: int = await pool.fetchval(_REAP_SQL, self._clock(), REAP_BATCH)
            total += count
            if count < REAP_BATCH:
                return total

    async def remaining(self, tenant: str, subject: str | None = None) -> dict[str, Any]:
        """Limits, use and what is left per dimension, for the tenant and (given) the user."""
        windows = Windows.at(self._clock(), self.timezone)
        return await remaining_report(await self._db.pool(), tenant, subject, windows, self.timezone.key)
