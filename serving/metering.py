"""The two ends of every model call: admission (reserve quota) and settlement (charge usage).

`admit` is the only place a request is let in; `settle` the only place its usage is written. An
admitted request is settled exactly once, whatever ends it (success, error, client disconnect,
engine death): settlement runs in its own task, so a cancelled handler cannot lose it. Leases on
open reservations are renewed here; if this process dies, the ledger's reaper settles them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from agencyllm.auth.principal import Principal
from agencyllm.quotas.ledger import AdmissionRefused, Ledger, Reservation, ReservationRequest
from agencyllm.serving.errors import OpenAIError

log = logging.getLogger("agencyllm.metering")


@dataclass
class Admitted:
    reservation: Reservation
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    settled: bool = False

    @property
    def max_tokens(self) -> int:
        return self.reservation.max_tokens

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()


class Metering:
    def __init__(self, ledger: Ledger, *, lease_seconds: int) -> None:
        self._ledger = ledger
        self._every = max(lease_seconds / 3, 1.0)
        self._open: dict[str, Admitted] = {}
        self._settlements: set[asyncio.Task] = set()
        self._upkeep: asyncio.Task | None = None

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
            model=model,
            endpoint=endpoint,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            context_length=context_length,
        )
        try:
            reservation = await self._ledger.reserve(request)
        except AdmissionRefused as refused:
            headers = dict(refused.headers)
            if refused.retry_after is not None:
                headers["retry-after"] = str(max(1, round(refused.retry_after)))
            raise OpenAIError(
                refused.status, refused.message, type=refused.type, param=refused.param, code=refused.code, headers=headers
            ) from None
        admitted = Admitted(reservation)
        self._open[request_id] = admitted
        return admitted

    async def settle(self, admitted: Admitted, *, prompt_tokens: int, completion_tokens: int, status: str) -> None:
        if admitted.settled:
            return
        admitted.settled = True
        now = time.monotonic()
        ttft_ms = None if admitted.first_token_at is None else (admitted.first_token_at - admitted.started) * 1000
        task = asyncio.ensure_future(
            self._ledger.settle(
                admitted.reservation,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                status=status,
                ttft_ms=ttft_ms,
                latency_ms=(now - admitted.started) * 1000,
            )
        )
        self._settlements.add(task)
        task.add_done_callback(lambda t: self._settled(admitted, t))
        # Shielded: a client disconnect cancels the handler, never the write of its ledger row.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    def _settled(self, admitted: Admitted, task: asyncio.Task) -> None:
        self._settlements.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._open.pop(admitted.reservation.request_id, None)
            return
        # Left open: the lease lapses and the reaper settles it (the ledger row is written there).
        log.error("settlement failed for request %s; the reaper will settle it", admitted.reservation.request_id)

    def start(self) -> None:
        """Keep this process's leases alive and settle the leases of processes that died."""
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_forever())

    async def _upkeep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            open_reservations = [a.reservation for a in self._open.values() if not a.settled]
            try:
                if open_reservations:
                    await self._ledger.renew(open_reservations)
                reaped = await self._ledger.reap()
                if reaped:
                    log.warning("settled %d reservation(s) whose ingress stopped renewing them", reaped)
            except Exception as exc:  # the next round retries; a lease outlives several rounds
                log.warning("lease upkeep failed: %s", type(exc).__name__)

    async def drain(self) -> None:
        """Wait for pending settlements (graceful shutdown)."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
        if self._upkeep:
            self._upkeep.cancel()
