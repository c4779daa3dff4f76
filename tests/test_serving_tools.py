"""Tool calling as agents use it: the official SDK against the real stack (Ray Serve + vLLM CPU).

The placeholder model is configured with vLLM's `hermes` parser (its chat template lists the tools
and writes calls Hermes-style). Its weights are random, so `auto` proves only that the choice is
accepted and answered; `required` and named choices are enforced by guided decoding, so they
return real calls to the listed tools whatever the weights, and that is what is asserted. Under
`required` a model may make any number of calls and ends the list itself; random weights never do,
so those requests stop at the first call's closing tag (kept in the output, where vLLM's parser
reads it), as a real model's reply would end.
"""

from __future__ import annotations

import json

import pytest
from test_serving_quotas import new_tenant, wait_for_ledger_row

from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Parameters with few possible values: guided decoding on random weights ends quickly and validly.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_time"}}
FIRST_CALL = {"stop": ["</tool_call>"], "extra_body": {"include_stop_str_in_output": True}}


def ends(choice) -> dict:
    return FIRST_CALL if choice == "required" else {}


def arguments_of(name: str, arguments: str) -> dict:
    parsed = json.loads(arguments)
    if name == "get_weather":
        assert parsed["city"] in ("Paris", "Rome") and isinstance(parsed["celsius"], bool), parsed
    else:
        assert parsed == {"zone": parsed["zone"]} and parsed["zone"] in ("UTC", "CET"), parsed
    return parsed


def test_required_calls_one_or_more_of_the_listed_tools(stack):
    reply = stack.openai().chat.completions.create(
        model=PLACEHOLDER_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, **FIRST_CALL
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls, reply
    for call in calls:
        assert call.type == "function" and call.id
        arguments_of(call.function.name, call.function.arguments)


def test_a_named_function_is_the_one_called(stack):
    reply = stack.openai().chat.completions.create(
        model=PLACEHOLDER_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=200
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    arguments_of("get_time", call.function.arguments)


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_streamed_tool_calls_arrive_as_deltas(stack, choice):
    chunks = list(
        stack.openai().chat.completions.create(
            model=PLACEHOLDER_ID,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
            **ends(choice),
        )
    )
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice_delta in chunk.choices:
            for delta in choice_delta.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert calls, "no tool-call deltas streamed"
    for call in calls.values():
        arguments_of(call["name"], call["arguments"])
    if choice == NAMED:
        assert [c["name"] for c in calls.values()] == ["get_time"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_none_answers_in_text_and_auto_lets_the_model_decide(stack):
    client = stack.openai()
    plain = client.chat.completions.create(
        model=PLACEHOLDER_ID, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=6
    )
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
    decided = client.chat.completions.create(model=PLACEHOLDER_ID, messages=ASK, tools=[WEATHER], max_tokens=6)
    message = decided.choices[0].message
    assert message.content or message.tool_calls


def test_tool_results_go_back_in_and_the_definitions_are_charged(stack, pg_url):
    tenant, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    first = client.chat.completions.create(
        model=PLACEHOLDER_ID, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "temperature": 21}'},
    ]
    answered = client.chat.completions.with_raw_response.create(
        model=PLACEHOLDER_ID, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=6
    )
    reply = answered.parse()
    assert reply.choices[0].message.content
    without_tools = client.chat.completions.create(model=PLACEHOLDER_ID, messages=history, max_tokens=1)
    # The template lists the tool definitions in the prompt: the engine counts them, and so do we.
    assert reply.usage.prompt_tokens > without_tools.usage.prompt_tokens + 30
    request_id = answered.headers["x-agencyllm-request-id"]
    row = wait_for_ledger_row(pg_url, tenant, request_id)[request_id]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
