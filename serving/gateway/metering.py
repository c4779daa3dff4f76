"""The two ends of every model call: admission (reserve quota) and settlement (charge usage).

`admit` is the only place a request is let in; `settle` the only place its usage is written. An
admitted request is settled exactly once, whatever ends it (success, error, client disconnect,
engine death): settlement runs in its own task, so a cancelled handler cannot lose it. The
ledger's maintenance task renews this process's leases; if the process dies, any replica's
maintenance task settles them (the reaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from agencyllm.auth.principal import Principal
from agencyllm.quotas.db import availability, database_unavailable
from agencyllm.quotas.ledger import Ledger, Reservation, ReservationRequest
from agencyllm.serving.gateway.errors import OpenAIError

log = logging.getLogger("agencyllm.metering")


# A settlement that cannot reach the database is retried for up to this share of the lease:
# long enough to ride out a database restart, short enough that the reaper never races it.
SETTLE_RETRY_SHARE = 0.6
# How long a handler waits for its own ledger row before answering (the write goes on anyway).
SETTLE_WAIT_SECONDS = 5.0
# Replica shutdown: how long the last settlements may take.
DRAIN_SECONDS = 15.0


@dataclass
class Admitted:
    reservation: Reservation
    # Counted by our tokenizer at admission: what the engine reads once it has the request.
    prompt_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # Completion tokens seen so far (streams), for requests that end without a usage report.
    completion_tokens: int = 0
    settled: bool = False

    @property
    def max_tokens(self) -> int:
        return self.reservation.max_tokens

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()


class Metering:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._settlements: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, Admitted] = {}
        self._maintenance: asyncio.Task[None] | None = None

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        model: str,
        endpoint: str,
        prompt_tokens: int,
        max_tokens: int | None,
        context_length: int,
    ) -> Admitted:
        if principal.tenant is None:
            raise OpenAIError(403, "Your account is not assigned to a tenant, so it cannot call models.")
        request = ReservationRequest(
            request_id=request_id,
            tenant=principal.tenant,
            subject=principal.subject,
            username=principal.username,
            key_id=principal.key_id,
            client_id=principal.client_id,
            model=model,
            endpoint=endpoint,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_length=context_length,
        )
        reservation = await self._ledger.reserve(request)  # AdmissionRefused: serving/gateway/errors.py answers it
        availability.ok()
        admitted = Admitted(reservation, prompt_tokens=prompt_tokens)
        self._in_flight[request_id] = admitted
        return admitted

    def settle_later(
        self, admitted: Admitted, *, status: str, prompt_tokens: int | None = None, completion_tokens: int | None = None
    ) -> asyncio.Task[None] | None:
        """Start settling, once (later calls do nothing); the caller need not wait. Token counts
        default to what is known: the prompt counted at admission, the completion tokens seen."""
        if admitted.settled:
            return None
        admitted.settled = True
        self._in_flight.pop(admitted.reservation.request_id, None)
        ttft_ms = None if admitted.first_token_at is None else (admitted.first_token_at - admitted.started) * 1000
        task = asyncio.ensure_future(
            self._settle(
                admitted.reservation,
                prompt_tokens=admitted.prompt_tokens if prompt_tokens is None else prompt_tokens,
                completion_tokens=admitted.completion_tokens if completion_tokens is None else completion_tokens,
                status=status,
                ttft_ms=ttft_ms,
                latency_ms=(time.monotonic() - admitted.started) * 1000,
            )
        )
        self._settlements.add(task)
        task.add_done_callback(self._settled)
        return task

    async def settle(
        self, admitted: Admitted, *, status: str, prompt_tokens: int | None = None, completion_tokens: int | None = None
    ) -> None:
        """Settle and wait a little for the ledger row (never longer than SETTLE_WAIT_SECONDS)."""
        task = self.settle_later(
            admitted, status=status, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        if task is not None:
            # Shielded: a client disconnect cancels the handler, never the write of its ledger row.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), SETTLE_WAIT_SECONDS)

    async def _settle(
        self,
        reservation: Reservation,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        status: str,
        ttft_ms: float | None,
        latency_ms: float,
    ) -> None:
        """`Ledger.settle`, retried while the database is unreachable (settling is idempotent)."""
        deadline = time.monotonic() + self._ledger.lease.total_seconds() * SETTLE_RETRY_SHARE
        pause = 0.5
        while True:
            try:
                await self._ledger.settle(
                    reservation,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    status=status,
                    ttft_ms=ttft_ms,
                    latency_ms=latency_ms,
                )
                return
            except Exception as exc:
                if not database_unavailable(exc) or time.monotonic() + pause > deadline:
                    raise
                availability.failed(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settlements.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The reservation stays open: its lease lapses and the reaper writes its ledger row.
            log.error("settlement failed (%s); the reaper will settle it", type(task.exception()).__name__)

    def start(self) -> None:
        """Renew this process's leases and settle those of processes that died, for good."""
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._ledger.maintain())

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Replica shutdown: settle what is still in flight (cancelled, with the tokens known so
        far), then wait for pending settlements, at most `timeout` seconds."""
        for admitted in list(self._in_flight.values()):
            self.settle_later(admitted, status="cancelled")
        if self._settlements:
            await asyncio.wait(list(self._settlements), timeout=timeout)
        if self._maintenance:
            self._maintenance.cancel()
