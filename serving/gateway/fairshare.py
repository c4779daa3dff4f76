"""Fair admission in front of one engine replica: who gets the engine *now*.

Quotas decide how much a tenant may spend in a day; this queue decides who runs when tenants
compete for an engine's running slots (vLLM's `max_num_seqs`). It is

- work-conserving: a tenant alone may fill every slot;
- fair: when tenants wait, the next free slot goes to the tenant with the fewest running
  requests per unit of `share` (weighted fair sharing of slots), so a tenant with 50 waiting
  requests cannot push out one with a single request;
- class-aware: `interactive_reserve` slots are never given to `batch` work, so a flood of batch
  requests never fills the engine; within a tenant, interactive requests go first;
- quick to let a newcomer in: a running request cannot be preempted, so when every slot is busy
  an interactive request of a tenant holding less than its fair share may start at once in one
  of `burst` extra slots (the engine is sized `slots + burst`); the next slots freed are not
  refilled until the engine is back within `slots`, so the burst is paid back at once;
- bounded: a request waits at most `max_wait_seconds` and a tenant queues at most
  `max_queued_per_tenant` requests; past either it is refused (`QueueRefused`) and the caller
  releases its quota reservation.

Plain asyncio, no Ray: the engine deployment (`serving/rayserve/engines.py`) owns one queue per replica.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from agencyllm.quotas.models import TRAFFIC_CLASSES
from agencyllm.serving.gateway.inputs import InvalidInput

TrafficClass = Literal["interactive", "batch"]
# A caller may run a request as batch work (docs/quotas.md, "Fair sharing"); so does OpenAI's
# `service_tier: "flex"`. Nothing lets a batch key's request run as interactive.
TRAFFIC_CLASS_HEADER = "x-agencyllm-traffic-class"
# vLLM's scheduler runs lower values first and preempts higher values first under memory pressure.
ENGINE_PRIORITY: dict[TrafficClass, int] = {"interactive": 0, "batch": 10}


def requested_class(asked: str | None, body: Any, caller: TrafficClass) -> TrafficClass:
    """The class a request runs as: batch if the caller's key, the header `asked` or the body's
    `service_tier: "flex"` says so (the body's service tier is not passed on to the engine)."""
    if asked is not None and asked not in TRAFFIC_CLASSES:
        raise InvalidInput(f"'{TRAFFIC_CLASS_HEADER}' must be 'interactive' or 'batch'.", param=TRAFFIC_CLASS_HEADER)
    if getattr(body, "service_tier", None) == "flex":
        asked = "batch"
    if hasattr(body, "service_tier"):
        body.service_tier = None
    return "batch" if "batch" in (asked, caller) else "interactive"


@dataclass(frozen=True)
class Ticket:
    """What the ingress tells the engine replica about a request it admitted."""

    tenant: str
    share: float = 1.0
    traffic_class: TrafficClass = "interactive"


class QueueRefused(Exception):
    """The request was not started; nothing ran, so nothing is charged."""

    def __init__(self, reason: Literal["queue_full", "wait_timeout"], message: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class TenantLoad:
    """A tenant's state in one queue, as metrics report it."""

    tenant: str
    waiting: int
    running: int


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    arrived: float
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Tenant:
    share: float = 1.0
    running: int = 0
    waiting: dict[str, deque[_Waiter]] = field(default_factory=lambda: {c: deque() for c in TRAFFIC_CLASSES})

    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())


class Slot:
    """A running slot; `release()` (or leaving the `async with`) gives it back, once."""

    def __init__(self, give_back: Callable[[Ticket], None], ticket: Ticket, waited: float) -> None:
        self._give_back = give_back
        self.ticket = ticket
        self.waited = waited
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back(self.ticket)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.release()


class FairQueue:
    def __init__(
        self,
        slots: int,
        *,
        interactive_reserve: int = 0,
        burst: int = 0,
        max_wait_seconds: float = 60.0,
        max_queued_per_tenant: int = 256,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[TenantLoad], None] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        if not 0 <= interactive_reserve < slots:
            raise ValueError("interactive_reserve must be between 0 and slots - 1")
        if burst < 0:
            raise ValueError("burst must not be negative")
        self.slots = slots
        self.interactive_reserve = interactive_reserve
        self.burst = burst
        self.max_wait_seconds = max_wait_seconds
        self.max_queued_per_tenant = max_queued_per_tenant
        self._clock = clock
        self._on_change = on_change
        self._tenants: dict[str, _Tenant] = {}
        self.running = 0
        self.batch_running = 0

    # ---- state ---------------------------------------------------------------------------

    def load(self, tenant: str) -> TenantLoad:
        state = self._tenants.get(tenant)
        return TenantLoad(tenant, state.queued() if state else 0, state.running if state else 0)

    @property
    def waiting(self) -> int:
        return sum(t.queued() for t in self._tenants.values())

    # ---- acquire and release ---------------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Slot:
        """Wait for a running slot; raise `QueueRefused` when the queue is full or the wait too long."""
        state = self._tenants.setdefault(ticket.tenant, _Tenant())
        state.share = ticket.share
        arrived = self._clock()
        if (self._eligible(ticket.traffic_class) and not self._anyone_ahead(ticket)) or self._may_burst(ticket, state):
            self._start(ticket, state)
            return Slot(self._release, ticket, 0.0)
        if state.queued() >= self.max_queued_per_tenant:
            self._forget_if_idle(ticket.tenant)
            raise QueueRefused(
                "queue_full",
                f"Too many of your requests are waiting for this model ({self.max_queued_per_tenant}); retry shortly.",
                retry_after=self._retry_after(),
            )
        waiter = _Waiter(ticket, arrived)
        state.waiting[ticket.traffic_class].append(waiter)
        self._changed(ticket.tenant)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout=self.max_wait_seconds)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted in the same instant: the slot is ours to use (timeout) or give back (cancel).
                slot = Slot(self._release, ticket, self._clock() - arrived)
                if isinstance(exc, asyncio.CancelledError):
                    slot.release()
                    raise
                return slot
            waiter.granted.cancel()
            state.waiting[ticket.traffic_class].remove(waiter)
            self._forget_if_idle(ticket.tenant)
            self._changed(ticket.tenant)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise QueueRefused(
                "wait_timeout",
                f"The model is busy: your request waited {self.max_wait_seconds:g}s for a slot. Retry later.",
                retry_after=self._retry_after(),
            ) from None
        return Slot(self._release, ticket, self._clock() - arrived)

    def _release(self, ticket: Ticket) -> None:
        state = self._tenants[ticket.tenant]
        state.running -= 1
        self.running -= 1
        if ticket.traffic_class == "batch":
            self.batch_running -= 1
        self._dispatch()
        self._forget_if_idle(ticket.tenant)
        self._changed(ticket.tenant)

    # ---- scheduling ----------------------------------------------------------------------

    def _eligible(self, traffic_class: TrafficClass) -> bool:
        if self.running >= self.slots:
            return False
        return traffic_class == "interactive" or self.batch_running < self.slots - self.interactive_reserve

    def _may_burst(self, ticket: Ticket, state: _Tenant) -> bool:
        """Every slot is busy; may this interactive request start in a burst slot?"""
        if ticket.traffic_class != "interactive" or not self.slots <= self.running < self.slots + self.burst:
            return False
        active = [t for t in self._tenants.values() if t.running or t.queued() or t is state]
        fair = self.slots * state.share / sum(t.share for t in active)
        return state.running < fair and state.queued() == 0

    def _anyone_ahead(self, ticket: Ticket) -> bool:
        """Whether a waiting request would take the free slot before this newcomer."""
        mine = self._tenants[ticket.tenant]
        newcomer = mine.running / mine.share
        for name, state in self._tenants.items():
            head = self._head(state)
            if head is not None and (name == ticket.tenant or state.running / state.share <= newcomer):
                return True
        return False

    def _head(self, state: _Tenant) -> _Waiter | None:
        if state.waiting["interactive"]:
            return state.waiting["interactive"][0]
        if state.waiting["batch"] and self._eligible("batch"):
            return state.waiting["batch"][0]
        return None

    def _dispatch(self) -> None:
        """Hand free slots to waiting requests: fewest running per share first, then oldest."""
        while self.running < self.slots:
            best: tuple[float, float, str, _Waiter] | None = None
            for name, state in self._tenants.items():
                head = self._head(state)
                if head is None:
                    continue
                key = (state.running / state.share, head.arrived, name, head)
                if best is None or key[:2] < best[:2]:
                    best = key
            if best is None:
                return
            _, _, name, waiter = best
            state = self._tenants[name]
            state.waiting[waiter.ticket.traffic_class].popleft()
            self._start(waiter.ticket, state)
            waiter.granted.set_result(None)
            self._changed(name)

    def _start(self, ticket: Ticket, state: _Tenant) -> None:
        state.running += 1
        self.running += 1
        if ticket.traffic_class == "batch":
            self.batch_running += 1
        self._changed(ticket.tenant)

    def _forget_if_idle(self, tenant: str) -> None:
        state = self._tenants.get(tenant)
        if state is not None and state.running == 0 and state.queued() == 0:
            del self._tenants[tenant]

    def _retry_after(self) -> int:
        return retry_after_seconds(self.max_wait_seconds)

    def _changed(self, tenant: str) -> None:
        if self._on_change is not None:
            self._on_change(self.load(tenant))


def retry_after_seconds(max_wait_seconds: float) -> int:
    """The Retry-After a refused request gets: a quarter of the wait limit, 1 to 8 seconds."""
    return max(1, min(8, math.ceil(max_wait_seconds / 4)))


class TenantShares:
    """Tenants' fair-sharing weights, read from the quota policies at most every `ttl` seconds.

    Shares change rarely and a stale weight for a few seconds is harmless, so the request path
    never waits for the database here: a stale cache is refreshed in the background.
    """

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, float]]], *, ttl: float = 10.0) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._shares: dict[str, float] = {}
        self._fetched_at = -math.inf
        self._refreshing: asyncio.Task[None] | None = None

    def share(self, tenant: str) -> float:
        if time.monotonic() - self._fetched_at > self._ttl and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self.refresh())
        return self._shares.get(tenant, 1.0)

    async def refresh(self) -> None:
        try:
            self._shares = await self._fetch()
        except Exception:  # database away: keep the last weights; quotas report the outage
            pass
        self._fetched_at = time.monotonic()
