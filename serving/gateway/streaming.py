"""Relaying an engine's server-sent events to the client while learning the request's usage.

The ingress always asks the engine for a final usage chunk (`stream_options.include_usage`) and
passes it on only if the client asked for it, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send


@dataclass
class StreamUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Chunks that carried generated text: the best count left when a stream is cut short.
    content_chunks: int = 0
    reported: bool = False
    failed: bool = False
    done: bool = False

    def observe(self, event: str) -> bool:
        """Record what one SSE event says; return False when the client should not see it."""
        payload = event[6:].strip() if event.startswith("data: ") else ""
        if payload == "[DONE]":
            self.done = True
        if not payload or payload == "[DONE]":
            return True
        if '"usage"' not in payload and '"error"' not in payload:
            self.content_chunks += 1
            return True
        data = json.loads(payload)
        if "error" in data:
            self.failed = True
            return True
        usage = data.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", 0)
            self.completion_tokens = usage.get("completion_tokens", 0)
            self.reported = True
        if data.get("choices"):
            self.content_chunks += 1
            return True
        return False  # the usage-only final chunk

    def best_completion_tokens(self) -> int:
        """The engine's own count when it reported one; otherwise one token per chunk of text
        (the engine makes one event per generated token and choice; a handle item may carry several)."""
        return self.completion_tokens if self.reported else self.content_chunks


class StreamCut(Exception):
    """The engine's stream ended without `[DONE]`: its replica went away mid-answer."""


def split_events(item: str | list[Any]) -> list[str]:
    """Engine output arrives as lists of SSE strings (one per step when batching is off)."""
    items = item if isinstance(item, list) else [item]
    events: list[str] = []
    for text in items:
        if not isinstance(text, str):
            text = f"data: {text.model_dump_json()}\n\n"
        events.extend(e + "\n\n" for e in text.split("\n\n") if e)
    return events


async def relay(
    engine_stream: AsyncIterator[Any],
    usage: StreamUsage,
    *,
    client_wants_usage: bool,
    on_first_event: Callable[[], None],
) -> AsyncIterator[str]:
    async for item in engine_stream:
        for event in split_events(item):
            on_first_event()
            keep = usage.observe(event)
            if keep or client_wants_usage:
                yield event
    if not (usage.done or usage.failed):
        raise StreamCut("the engine's event stream ended without [DONE]")


class OpenStreams:
    """The event streams one replica is sending. At a stop, `end_all` ends each in band with
    `farewell` (an error event and `[DONE]`) instead of leaving it to be cut off."""

    def __init__(self, farewell: list[str]) -> None:
        self.farewell = farewell
        self.stopping = False
        self.open: set[EventStreamResponse] = set()

    def response(
        self, body: AsyncGenerator[str, None], *, on_close: Callable[[], None], headers: dict[str, str]
    ) -> EventStreamResponse:
        return EventStreamResponse(body, streams=self, on_close=on_close, headers=headers)

    async def end_all(self, timeout: float) -> int:
        """Stop: streams started from now on send only the farewell; those open end now."""
        self.stopping = True
        ending = list(self.open)
        for stream in ending:
            stream.end_in_band()
        if ending:
            await asyncio.wait([asyncio.ensure_future(stream.ended.wait()) for stream in ending], timeout=timeout)
        return len(ending)


class EventStreamResponse(StreamingResponse):
    """A server-sent event stream that is closed however the response ends.

    Starlette leaves the body of a cancelled response (the client left while a chunk was being
    sent) to the garbage collector, and with it the engine call and the request's settlement;
    a body cut off before its first item would never run its clean-up at all. This response
    closes its body at once, then calls `on_close`, which must be idempotent. Ended in band
    (`end_in_band`, a stop), it closes the body first and then sends its farewell, wherever
    the stop found it: waiting for the engine or sending a chunk."""

    def __init__(
        self,
        body: AsyncGenerator[str, None],
        *,
        streams: OpenStreams,
        on_close: Callable[[], None],
        headers: dict[str, str],
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._body = body
        self._streams = streams
        self._on_close = on_close
        self._sender: asyncio.Task[Any] | None = None
        self._ending = False
        self.ended = asyncio.Event()

    def end_in_band(self) -> None:
        self._ending = True
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._streams.open.add(self)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams.open.discard(self)
            try:
                await self._body.aclose()
            finally:
                self._on_close()
                self.ended.set()

    async def stream_response(self, send: Send) -> None:
        self._sender = sender = asyncio.current_task()
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            await send(message)
            started = True

        try:
            if not self._streams.stopping:
                await super().stream_response(sending)
                return
        except asyncio.CancelledError:
            if not self._ending:
                raise
            if sender is not None and sender.cancelling():
                sender.uncancel()
        await self._body.aclose()
        self._on_close()  # the engine call is aborted and its row on its way before the farewell
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for event in self._streams.farewell:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
