"""Runs batch lines: on every ingress replica, a few at a time, leased from Postgres.

Each line goes through the same path as an interactive request of its owner (admission against
their quotas, the engine, settlement), in the batch traffic class, so interactive users keep their
latency. A line is charged exactly once: its ledger row carries the line's own request id, and a
line taken over from a lost worker is first looked up there. If the lost attempt was settled (the
reaper settles one whose worker died), the line runs again without a second charge; if its
reservation is still open, the line waits until the reaper has settled it.

A refused admission (quota spent, engine busy or away) puts the line back with a time to retry:
lines wait for the next quota window until the batch's completion window ends, then the batch
ends as `expired` with an error line for each one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from agencyllm.auth.principal import Principal, Role
from agencyllm.quotas.batches.files import FileStore
from agencyllm.quotas.batches.jobs import Batch, BatchStore, Line, line_request_id, output_record
from agencyllm.serving.gateway.bodies import body_checks
from agencyllm.serving.gateway.errors import as_openai_error
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.gateway.responses import run_response

log = logging.getLogger("agencyllm.batches")

IDLE_SECONDS = 1.0
BATCH_CACHE_SECONDS = 1.0
SWEEP_SECONDS = 2.0
# A line that could not run for a reason of ours (engine away, database lost) is retried after this.
RETRY_SECONDS = 5.0
ENGINE_METHODS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings", "/v1/responses": "chat"}


def owner_principal(batch: Batch) -> Principal:
    owner = batch.owner
    return Principal(
        subject=owner["subject"],
        username=owner.get("username"),
        client_id=owner.get("client_id"),
        tenant=batch.row["tenant"],
        roles=frozenset(Role(role) for role in owner.get("roles", []) if role in Role.__members__.values()),
        auth_method=owner.get("auth_method", "api_key"),
        key_id=owner.get("key_id"),
        traffic_class="batch",
    )


class BatchWorker:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.store = BatchStore(gateway.services.database, FileStore(gateway.services.database))
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._running: dict[tuple[str, int], tuple[Line, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Set when a line ends (a slot is free) or the worker stops: the loop takes more at once.
        self._wake = asyncio.Event()
        self._batches: dict[str, tuple[float, Batch | None]] = {}

    def start(self) -> None:
        if self.settings.batch_concurrency > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-worker")

    async def stop(self) -> None:
        """Stop taking lines; the ones running end as cancelled (settled) and run again elsewhere."""
        self._stopping.set()
        self._wake.set()
        for _, task in list(self._running.values()):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(task for _, task in self._running.values()), return_exceptions=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = next_renew = loop.time()
        while not self._stopping.is_set():
            try:
                took = await self._take()
                now = loop.time()
                if now >= next_renew:
                    await self.store.renew(self.name, [line for line, _ in self._running.values()], self._lease())
                    next_renew = now + self._lease() / 3
                if now >= next_sweep:
                    await self.store.sweep(self.settings.file_storage_bytes_per_tenant)
                    next_sweep = now + SWEEP_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: keep the lines we hold, try again
                log.warning("batch worker: %s; retrying", type(exc).__name__)
                took = 0
                await asyncio.sleep(RETRY_SECONDS)
            if not took:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_SECONDS)
                self._wake.clear()

    def _lease(self) -> float:
        return self.settings.batch_lease_seconds

    async def _take(self) -> int:
        free = self.settings.batch_concurrency - len(self._running)
        if free <= 0:
            return 0
        lines = await self.store.lease(self.name, free, self._lease())
        for line in lines:
            key = (line.batch_id, line.line_no)
            task = asyncio.get_running_loop().create_task(self._run(line), name=f"batch-line-{line.line_no}")
            self._running[key] = (line, task)
            task.add_done_callback(self._forget(key))
        return len(lines)

    def _forget(self, key: tuple[str, int]) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self._running.pop(key, None)
            self._wake.set()

        return forget

    async def _batch(self, batch_id: str) -> Batch | None:
        """The line's batch, read again at most every second (a cancel is seen within it)."""
        now = asyncio.get_running_loop().time()
        cached = self._batches.get(batch_id)
        if cached is None or now - cached[0] > BATCH_CACHE_SECONDS:
            cached = self._batches[batch_id] = (now, await self.store.by_id(batch_id))
            if len(self._batches) > 1000:
                self._batches.clear()
        return cached[1]

    async def _run(self, line: Line) -> None:
        try:
            await self._run_line(line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database away: the line's lease runs out and another worker takes it
            log.error("batch line %s-%d: %s", line.batch_id, line.line_no, type(exc).__name__)

    async def _run_line(self, line: Line) -> None:
        batch = await self._batch(line.batch_id)
        if batch is None or batch.row["status"] != "in_progress":
            await self.store.requeue(self.name, line, None)  # cancelled or closed: the sweep ends it
            return
        request_id = line_request_id(line.batch_id, line.line_no)
        uncharged = False
        if line.attempts > 1:
            state, request_id = await self.store.charged(line.batch_id, line.line_no)
            if state == "reserved":  # the lost attempt's reservation: wait for the reaper to settle it
                await self.store.requeue(self.name, line, _later(self._lease()))
                return
            uncharged = state == "settled"
        try:
            status, payload = await self._answer(batch, line, request_id, uncharged)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = as_openai_error(exc)
            if error is None or error.status in (429, 503):
                headers = {k.lower(): v for k, v in (error.headers if error is not None else {}).items()}
                retry = headers.get("retry-after")
                await self.store.requeue(self.name, line, _later(float(retry) if retry else RETRY_SECONDS))
                if error is None:
                    log.error("batch line %s failed: %s", request_id, type(exc).__name__)
                return
            status, payload = error.status, error.body()
        usage = payload.get("usage") or {} if isinstance(payload, dict) else {}
        ok = status == 200
        record = output_record(line.custom_id, request_id, status, payload)
        prompt = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0) if not uncharged else 0
        completion = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0) if not uncharged else 0
        finished = await self.store.finish(
            self.name, line, record, ok=ok, input_tokens=prompt, output_tokens=completion
        )
        if not finished:
            log.warning("batch line %s: its lease was lost before it ended", request_id)

    async def _answer(self, batch: Batch, line: Line, request_id: str, uncharged: bool) -> tuple[int, Any]:
        """The line's HTTP status and body, as the endpoint would have answered it."""
        gateway = self.gateway
        principal = owner_principal(batch)
        ticket = gateway.batch_ticket(principal.tenant or "")
        endpoint = batch.row["endpoint"]
        data = dict(line.body)
        if endpoint == "/v1/responses":
            return await run_response(gateway, principal, ticket, data, request_id=request_id, uncharged=uncharged)
        kind = ENGINE_METHODS[endpoint]
        body_checks(self.settings, kind)(data)
        body = gateway.chat_request(data, kind)
        if uncharged:
            return 200, await gateway.answer_uncharged(body, kind, ticket)
        if kind == "embeddings":
            response = await gateway.run_embeddings(principal, body, ticket, request_id=request_id)
        else:
            response = await gateway.run_chat(principal, body, ticket, False, request_id=request_id)
        return response.status_code, json.loads(bytes(response.body))


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)
