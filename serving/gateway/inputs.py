"""Input checks at the edge, before anything parses a request into a model or reaches Postgres.

OpenAI's API refuses what these refuse, each with a 400 naming the parameter: text with NUL bytes
or lone UTF-16 surrogates (Postgres cannot store the first, tokenizers and pickling fail on the
second), JSON nested deeper than any real request needs (Python's parser and Ray's pickling
recurse), values of the wrong JSON type (`"max_tokens": "10"`, `"stream": "yes"`) that pydantic's
lax mode would coerce, and counts out of range (`n`, prompt lists, dates).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

# Tool schemas and structured-output schemas are the deepest real bodies; 64 levels is far more.
MAX_JSON_DEPTH = 64
# Items one Responses API request may carry in `input`.
MAX_INPUT_ITEMS = 4096
# Dates an admin may ask about or set: wide enough for any real use, far from datetime's limits
# (year 1 and 9999), where converting a time zone overflows.
EARLIEST = date(1970, 1, 1)
LATEST = date(9000, 12, 31)

_SURROGATE = re.compile("[\ud800-\udfff]")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class InvalidInput(ValueError):
    """A client's mistake, found at the edge: answered with 400 naming `param`."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def check_text(value: str, param: str | None) -> None:
    if "\x00" in value:
        raise InvalidInput(f"Invalid value for '{param or 'body'}': NUL bytes (\\u0000) are not allowed.", param=param)
    if not value.isascii() and _SURROGATE.search(value):
        raise InvalidInput(
            f"Invalid value for '{param or 'body'}': "
            "the text holds a lone UTF-16 surrogate, which is not valid Unicode.",
            param=param,
        )


def _param(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(p) for p in path) or None


def check_tree(data: Any, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Every string (keys included) free of NUL and lone surrogates; nesting at most `max_depth`.
    Iterative, so a deep body cannot exhaust the stack here."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            check_text(value, _param(path))
        elif isinstance(value, dict | list):
            if len(path) >= max_depth:
                raise InvalidInput(
                    f"The request body is nested more than {max_depth} levels deep.",
                    param=_param(path[:1]),
                    code="too_deeply_nested",
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    check_text(key, _param((*path, key)))
                stack.append((item, (*path, key)))


def load_json(raw: bytes) -> Any:
    """Parse a JSON body and check it (`check_tree`); InvalidInput if it is not acceptable."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise InvalidInput(
            f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", code="too_deeply_nested"
        ) from None
    check_tree(data)
    return data


# ---- strict types of the OpenAI parameters (top level of /v1 bodies) ----------------------

_INTEGERS = {
    # name: (minimum, maximum); None: bounded by the caller (n) or by int32 only
    "max_tokens": (None, None),
    "max_completion_tokens": (None, None),
    "top_logprobs": (0, 20),
    "seed": (-INT64_MAX - 1, INT64_MAX),
    "best_of": (1, None),
    "top_k": (-1, None),
    "min_tokens": (0, None),
    "dimensions": (1, None),
    "truncate_prompt_tokens": (-1, None),
    "prompt_logprobs": (0, 20),
    "max_output_tokens": (None, None),
}
_BOOLEANS = {
    "stream",
    "echo",
    "ignore_eos",
    "skip_special_tokens",
    "parallel_tool_calls",
    "add_special_tokens",
    "add_generation_prompt",
    "continue_final_message",
    "include_stop_str_in_output",
    "spaces_between_special_tokens",
    "use_beam_search",
    "store",
    "background",
    "return_tokens_as_token_ids",
}
_NUMBERS = {
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "min_p",
    "repetition_penalty",
    "length_penalty",
}
_STRINGS = {
    "model",
    "user",
    "encoding_format",
    "suffix",
    "request_id",
    "cache_salt",
    "instructions",
    "previous_response_id",
}
_OBJECTS = {"stream_options", "response_format", "logit_bias", "metadata"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrong_type(name: str, expected: str, value: Any) -> InvalidInput:
    return InvalidInput(
        f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)}.",
        param=name,
        code="invalid_type",
    )


def check_openai_params(body: dict[str, Any], *, endpoint: str, max_choices: int, max_prompts: int) -> None:
    """OpenAI's types, strictly: no string for an integer, no string for a boolean; `n` within
    1..max_choices; at most `max_prompts` prompts (completions) or inputs (embeddings)."""
    for name, value in body.items():
        if value is None:
            continue
        if name == "logprobs" and endpoint == "completions":
            _check_integer(name, value, 0, 20)
        elif name == "logprobs" or name in _BOOLEANS:
            if not isinstance(value, bool):
                raise _wrong_type(name, "a boolean", value)
        elif name == "n":
            _check_integer(name, value, 1, max_choices)
        elif name in _INTEGERS:
            _check_integer(name, value, *_INTEGERS[name])
        elif name in _NUMBERS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _wrong_type(name, "a number", value)
        elif name in _STRINGS:
            if not isinstance(value, str):
                raise _wrong_type(name, "a string", value)
        elif name in _OBJECTS and not isinstance(value, dict):
            raise _wrong_type(name, "an object", value)
    required = {"chat": "messages", "completions": "prompt", "embeddings": "input", "responses": "input"}.get(endpoint)
    if required is not None and body.get(required) is None:
        raise InvalidInput(
            f"Missing required parameter: '{required}'.", param=required, code="missing_required_parameter"
        )
    if endpoint == "chat":
        _check_messages(body["messages"])
    if endpoint == "responses" and isinstance(body["input"], list) and len(body["input"]) > MAX_INPUT_ITEMS:
        raise InvalidInput(f"At most {MAX_INPUT_ITEMS} input items.", param="input", code="too_many_items")
    listed = {"completions": "prompt", "embeddings": "input"}.get(endpoint)
    if listed is not None:
        _check_prompt_list(listed, body.get(listed), max_prompts)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{index}]", "an object", message)
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise _wrong_type(f"messages[{index}].tool_calls", "an array", tool_calls)


def _check_integer(name: str, value: Any, low: int | None, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # OpenAI accepts 16.0
        else:
            raise _wrong_type(name, "an integer", value)
    low = -INT32_MAX - 1 if low is None else low
    high = INT32_MAX if high is None else high
    if not low <= value <= high:
        raise InvalidInput(f"Invalid value for '{name}': it must be between {low} and {high}.", param=name)


def _check_prompt_list(name: str, value: Any, max_prompts: int) -> None:
    if not isinstance(value, list) or not value:
        return
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return  # one prompt given as token ids
    if len(value) > max_prompts:
        raise InvalidInput(
            f"Invalid value for '{name}': at most {max_prompts} entries are allowed in one request, got {len(value)}.",
            param=name,
            code="too_many_inputs",
        )


# ---- admin query values and dates ---------------------------------------------------------


def check_query(items: Iterable[tuple[str, str]]) -> None:
    for name, value in items:
        check_text(name, name)
        check_text(value, name)


def check_date_range(value: date | datetime, param: str) -> None:
    day = value.date() if isinstance(value, datetime) else value
    if not EARLIEST <= day <= LATEST:
        raise InvalidInput(
            f"Invalid value for '{param}': dates must be between {EARLIEST.isoformat()} and {LATEST.isoformat()}.",
            param=param,
            code="date_out_of_range",
        )


def as_utc(value: datetime, param: str) -> datetime:
    """An aware UTC datetime (naive means UTC), range-checked so no conversion can overflow."""
    check_date_range(value, param)
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # pragma: no cover - excluded by the range check
        raise InvalidInput(f"Invalid value for '{param}': date out of range.", param=param) from None
