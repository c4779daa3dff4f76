"""Relaying an engine's server-sent events to the client while learning the request's usage.

The ingress always asks the engine for a final usage chunk (`stream_options.include_usage`) and
passes it on only if the client asked for it, as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass
class StreamUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Chunks that carried generated text: the best count left when a stream is cut short.
    content_chunks: int = 0
    reported: bool = False
    failed: bool = False

    def observe(self, event: str) -> bool:
        """Record what one SSE event says; return False when the client should not see it."""
        payload = event[6:].strip() if event.startswith("data: ") else ""
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


def split_events(item: str | list) -> list[str]:
    """Engine output arrives as lists of SSE strings (one per step when batching is off)."""
    items = item if isinstance(item, list) else [item]
    events: list[str] = []
    for text in items:
        if not isinstance(text, str):
            text = f"data: {text.model_dump_json()}\n\n"
        events.extend(e + "\n\n" for e in text.split("\n\n") if e)
    return events


async def relay(
    engine_stream: AsyncIterator,
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
