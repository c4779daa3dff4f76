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
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._settlements: set[asyncio.Task] = set()
        self._maintenance: asyncio.Task | None = None

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
        try:
            reservation = await self._ledger.reserve(request)
        except AdmissionRefused as refused:
            raise OpenAIError(
                refused.status, refused.message, type=refused.type, param=refused.param, code=refused.code, headers=refused.headers
            ) from None
        return Admitted(reservation)

    def settle_later(self, admitted: Admitted, *, prompt_tokens: int, completion_tokens: int, status: str) -> asyncio.Task | None:
        """Start settling; the caller need not wait (a stream's last byte leaves without it)."""
        if admitted.settled:
            return None
        admitted.settled = True
        ttft_ms = None if admitted.first_token_at is None else (admitted.first_token_at - admitted.started) * 1000
        task = asyncio.ensure_future(
            self._ledger.settle(
                admitted.reservation,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                status=status,
                ttft_ms=ttft_ms,
                latency_ms=(time.monotonic() - admitted.started) * 1000,
            )
        )
        self._settlements.add(task)
        task.add_done_callback(self._settled)
        return task

    async def settle(self, admitted: Admitted, *, prompt_tokens: int, completion_tokens: int, status: str) -> None:
        task = self.settle_later(admitted, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, status=status)
        if task is not None:
            # Shielded: a client disconnect cancels the handler, never the write of its ledger row.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    def _settled(self, task: asyncio.Task) -> None:
        self._settlements.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The reservation stays open: its lease lapses and the reaper writes its ledger row.
            log.error("settlement failed (%s); the reaper will settle it", type(task.exception()).__name__)

    def start(self) -> None:
        """Renew this process's leases and settle those of processes that died, for good."""
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._ledger.maintain())

    async def drain(self) -> None:
        """Wait for pending settlements (graceful shutdown)."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
        if self._maintenance:
            self._maintenance.cancel()
