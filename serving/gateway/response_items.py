"""The Responses API's request and items, and their translation to and from a chat request.

A `/v1/responses` call runs as one chat completion on the engine (vLLM's chat path, with its
tool parsers and guided decoding): the conversation so far (stored responses, oldest first), the
`instructions` as the first message, then this request's input items. Its answer comes back as
output items: a `message` with `output_text`, and one `function_call` item per tool call.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agencyllm.serving.gateway.inputs import InvalidInput

MAX_METADATA_KEYS = 16


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat = TextFormat(type="text")
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """`POST /v1/responses` as served here: text and function tools (no built-in tools, files or
    images), stored conversation state, streaming."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=512)
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    seed: int | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > MAX_METADATA_KEYS or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError("at most 16 keys of up to 64 characters, values of up to 512 characters")
        return value


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as stored input items (each with its own id)."""
    if isinstance(value, str):
        return [_message("user", [{"type": "input_text", "text": value}])]
    return [_item(item, f"input[{index}]") for index, item in enumerate(value)]


def _message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": new_id("msg"), "role": role, "content": content, "status": "completed"}


def _item(item: Any, param: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidInput("Each input item must be an object.", param=param)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidInput("A message's role must be user, assistant, system or developer.", param=f"{param}.role")
        content = item.get("content")
        if isinstance(content, str):
            part_type = "output_text" if role == "assistant" else "input_text"
            return _message(role, [{"type": part_type, "text": content}])
        if not isinstance(content, list) or not content:
            raise InvalidInput("A message's content must be a string or a list of parts.", param=f"{param}.content")
        parts = []
        for index, part in enumerate(content):
            where = f"{param}.content[{index}]"
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise InvalidInput("Only text content parts (input_text, output_text) are served here.", param=where)
            if not isinstance(part.get("text"), str):
                raise InvalidInput("A text part needs its text as a string.", param=f"{where}.text")
            parts.append({"type": part["type"] if part["type"] != "text" else "input_text", "text": part["text"]})
        return _message(role, parts)
    if kind == "function_call":
        fields = {name: item.get(name) for name in ("call_id", "name", "arguments")}
        for name, value in fields.items():
            if not isinstance(value, str) or not value:
                raise InvalidInput(f"A function_call item needs `{name}` as a string.", param=f"{param}.{name}")
        return {"type": "function_call", "id": new_id("fc"), **fields, "status": "completed"}
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidInput("A function_call_output item needs `call_id` as a string.", param=f"{param}.call_id")
        if not isinstance(output, str):
            raise InvalidInput("A function_call_output's `output` must be a string.", param=f"{param}.output")
        return {"type": "function_call_output", "id": new_id("fco"), "call_id": call_id, "output": output}
    raise InvalidInput(
        f"Input items of type {str(kind)[:40]!r} are not served here (message, function_call, function_call_output).",
        param=f"{param}.type",
    )


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input and output items, in order, as chat messages (function calls in a row become one
    assistant message with several tool calls)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_body(request: ResponsesRequest, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion that answers `request`, with `messages` the whole conversation."""
    if request.instructions:
        messages = [{"role": "system", "content": request.instructions}, *messages]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": request.stream}
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("user", "user"), ("seed", "seed"),
                         ("parallel_tool_calls", "parallel_tool_calls")):  # fmt: skip
        value = getattr(request, ours)
        if value is not None:
            body[theirs] = value
    if request.tools:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in request.tools
        ]
    if isinstance(request.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    form = request.text.format if request.text else None
    if form is not None and form.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif form is not None and form.type == "json_schema":
        if form.schema_ is None or not form.name:
            raise InvalidInput("A json_schema format needs `name` and `schema`.", param="text.format")
        schema = {"name": form.name, "schema": form.schema_, "strict": bool(form.strict)}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer's message as output items."""
    items: list[dict[str, Any]] = []
    if message.get("content"):
        text = {"type": "output_text", "text": message["content"], "annotations": [], "logprobs": []}
        items.append({**_message("assistant", [text])})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        items.append(
            {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call.get("id") or new_id("call"),
                "name": function.get("name", ""),
                "arguments": function.get("arguments", ""),
                "status": "completed",
            }
        )
    return items


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    prompt, completion = chat_usage.get("prompt_tokens") or 0, chat_usage.get("completion_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
