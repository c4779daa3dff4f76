"""What the gateway does to an OpenAI request body on its way to an engine (messages made
re-readable, a usage chunk asked for on every stream), and the model cards of /v1/models."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agencyllm.serving.config import ModelSpec
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.inputs import check_openai_params
from agencyllm.serving.settings import Settings

# Who owns the models in /v1/models (OpenAI's `owned_by`).
MODEL_OWNER = "organization-owner"


def model_card(spec: ModelSpec) -> dict[str, Any]:
    """A model as OpenAI's /v1/models lists it, plus what a client needs to size its requests."""
    return {
        "id": spec.id,
        "object": "model",
        "created": _created(spec),
        "owned_by": MODEL_OWNER,
        "permission": [],
        "metadata": {
            "model_id": spec.id,
            "input_modality": "text",
            "max_request_context_length": spec.context_length(),
        },
    }


def _created(spec: ModelSpec) -> int:
    """When the model's files were written: the same on every replica and node."""
    try:
        return int((spec.path / "config.json").stat().st_mtime)
    except OSError:
        return int(time.time())


def materialize_messages(body: Any) -> None:
    """Messages whose `content` (or an assistant's `tool_calls`) came as an iterable are held by
    pydantic as one-shot iterators, which can be neither pickled nor read twice: make them lists.
    A value that cannot be iterated is the client's mistake."""
    for i, message in enumerate(body.messages):
        if not isinstance(message, dict):
            body.messages[i] = message = message.model_dump()
        fields = ("content", "tool_calls") if message.get("role") == "assistant" else ("content",)
        for name in fields:
            value = message.get(name)
            if value is None or isinstance(value, str | list):
                continue
            try:
                message[name] = list(value)
            except (TypeError, ValueError):
                what = "a string, null or a list of content parts" if name == "content" else "a list of tool calls"
                raise OpenAIError(
                    400,
                    f"Validating messages' `{name}` failed: it must be {what}.",
                    param="messages",
                    code="invalid_value",
                ) from None


def ask_for_stream_usage(data: dict[str, Any], wants_usage: list[bool]) -> None:
    """On the raw body, before it is parsed: ask the engine for a final usage chunk on every
    stream. `wants_usage` gets False when the client sent no stream options (so the usage chunk
    is not passed on); a client's own options are left for parsing and read by `usage_wanted`."""
    if data.get("stream") and data.get("stream_options") is None:
        data["stream_options"] = {"include_usage": True}
        wants_usage.append(False)


def usage_wanted(body: Any, wants_usage: list[bool]) -> bool:
    """Whether the client asked for usage (always true without a stream); the engine is asked
    for it on every stream."""
    if not body.stream:
        return True
    if wants_usage:
        return wants_usage[0]
    options = body.stream_options
    client_wants_usage = bool(options.include_usage)
    options.include_usage = True
    return client_wants_usage


def body_checks(
    settings: Settings, endpoint: str, wants_usage: list[bool] | None = None
) -> Callable[[dict[str, Any]], None]:
    """What runs on a /v1 body's raw JSON before the engine's request model parses it: OpenAI's
    bounds, and (with `wants_usage`) whether the client asked for the stream's usage chunk."""

    def check(data: dict[str, Any]) -> None:
        check_openai_params(
            data, endpoint=endpoint, max_choices=settings.max_choices, max_prompts=settings.max_prompts_per_request
        )
        if wants_usage is not None:
            ask_for_stream_usage(data, wants_usage)

    return check


def list_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """One page of an OpenAI list (files, batches, a response's input items)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
