"""The Responses API as staff and agent SDKs use it: the official `openai` SDK against the real
stack (two ingress replicas behind Ray Serve's proxy, vLLM CPU, Postgres).

Stored responses live in Postgres: a conversation continues on whichever ingress replica takes
the next request; they belong to the tenant and the caller; a tenant that keeps no content
stores nothing. One usage-ledger row per response.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import openai
import pytest
from test_serving_quotas import new_tenant, wait_for_ledger_row

from agencyllm.quotas.db import Database
from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack

ASK = "Summarise the memo for the director."
DEEP = json.loads("[" * 70 + "]" * 70)  # deeper than any body may nest
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "The time in a zone",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}


def keeping_tenant(stack) -> tuple[str, str]:
    """A tenant that keeps content (30 days), and a key of it."""
    tenant, key = new_tenant(stack)
    with stack.admin() as admin:
        response = admin.put(f"/admin/v1/tenants/{tenant}/retention", json={"content_retention_days": 30})
        assert response.status_code == 200, response.text
    return tenant, key


def second_key(stack, tenant: str) -> str:
    with stack.admin() as admin:
        response = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"name": f"other-{uuid.uuid4().hex[:6]}"})
        assert response.status_code == 201, response.text
        return response.json()["key"]


def replica_counts(stack) -> dict[str, int]:
    """POST /v1/responses answered 200, per ingress replica (Ray Serve's access log)."""
    counts = {}
    for path in stack.serve_logs.glob("replica_*AgencyIngress*.log"):
        with open(path, errors="replace") as log:
            counts[path.name] = sum("POST /v1/responses 200" in line for line in log)
    return counts


def test_create_returns_a_response_with_usage_and_one_ledger_row(stack, pg_url):
    tenant, key = new_tenant(stack)
    raw = stack.openai(api_key=key).responses.with_raw_response.create(
        model=PLACEHOLDER_ID, input=ASK, instructions="Answer briefly.", max_output_tokens=8, store=False
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert 0 < response.usage.output_tokens <= 8 and response.usage.input_tokens > 0
    assert response.store is False and response.instructions == "Answer briefly."
    request_id = raw.headers["x-agencyllm-request-id"]
    row = wait_for_ledger_row(pg_url, tenant, request_id)[request_id]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )


def test_streaming_sends_the_responses_event_sequence(stack):
    _, key = new_tenant(stack)
    events = list(
        stack.openai(api_key=key).responses.create(model=PLACEHOLDER_ID, input=ASK, max_output_tokens=6, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], kinds
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert deltas and kinds.index("response.output_text.done") > kinds.index("response.output_text.delta")
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "".join(d.delta for d in deltas)
    assert final.usage.output_tokens == 6 or final.status == "completed"


def test_a_conversation_continues_on_any_ingress_replica(stack):
    _, key = keeping_tenant(stack)
    client = stack.openai(api_key=key)
    before = replica_counts(stack)
    first = client.responses.create(model=PLACEHOLDER_ID, input="Remember the code word: heron.", max_output_tokens=4)
    assert first.store is True
    previous, inputs = first, [first.usage.input_tokens]
    for turn in range(9):
        previous = client.responses.create(
            model=PLACEHOLDER_ID,
            input=f"Turn {turn}: what was it?",
            previous_response_id=previous.id,
            max_output_tokens=4,
        )
        inputs.append(previous.usage.input_tokens)
    # Each turn's prompt holds the whole conversation so far, read back from Postgres.
    assert inputs == sorted(inputs) and len(set(inputs)) == len(inputs), inputs
    assert client.responses.retrieve(previous.id).output_text == previous.output_text
    listed = client.responses.input_items.list(previous.id, order="asc")
    assert [item.content[0].text for item in listed.data] == ["Turn 8: what was it?"]
    time.sleep(2)  # Serve's access log is written asynchronously
    after = replica_counts(stack)
    served = {name: after[name] - before.get(name, 0) for name in after}
    assert len([n for n in served.values() if n > 0]) == 2, served  # both replicas took turns


def test_stored_responses_belong_to_the_tenant_and_the_caller(stack):
    tenant, key = keeping_tenant(stack)
    mine = stack.openai(api_key=key).responses.create(model=PLACEHOLDER_ID, input=ASK, max_output_tokens=4)
    colleague = stack.openai(api_key=second_key(stack, tenant))
    _, stranger_key = keeping_tenant(stack)
    stranger = stack.openai(api_key=stranger_key)
    for other in (colleague, stranger):
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model=PLACEHOLDER_ID, input="Go on.", previous_response_id=mine.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.input_items.list(mine.id)
    owner = stack.openai(api_key=key)
    owner.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(mine.id)


def test_a_tenant_that_keeps_no_content_stores_nothing(stack):
    _, key = new_tenant(stack)  # no content retention: the default
    client = stack.openai(api_key=key)
    response = client.responses.create(model=PLACEHOLDER_ID, input=ASK, max_output_tokens=4)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=PLACEHOLDER_ID, input=ASK, store=True)
    assert refused.value.body["code"] == "store_not_allowed" and "keeps no content" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as chained:
        client.responses.create(model=PLACEHOLDER_ID, input=ASK, previous_response_id=response.id)
    assert chained.value.body["param"] == "previous_response_id"
    assert "data-governance" in chained.value.body["message"]


def test_function_calls_and_their_outputs_continue_the_conversation(stack):
    _, key = keeping_tenant(stack)
    client = stack.openai(api_key=key)
    asked = client.responses.create(
        model=PLACEHOLDER_ID,
        input="What time is it in Paris?",
        tools=[TIME],
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=200,
    )
    (call,) = [item for item in asked.output if item.type == "function_call"]
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("UTC", "CET")
    answered = client.responses.create(
        model=PLACEHOLDER_ID,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"time": "09:00"}'}],
        tools=[TIME],
        tool_choice="none",
        max_output_tokens=4,
    )
    assert answered.output_text and answered.usage.input_tokens > asked.usage.input_tokens


def test_json_schema_output(stack):
    _, key = new_tenant(stack)
    schema = {
        "type": "object",
        "properties": {"priority": {"type": "string", "enum": ["low", "high"]}},
        "required": ["priority"],
        "additionalProperties": False,
    }
    response = stack.openai(api_key=key).responses.create(
        model=PLACEHOLDER_ID,
        input="Classify: the server room is flooding.",
        text={"format": {"type": "json_schema", "name": "triage", "schema": schema, "strict": True}},
        max_output_tokens=200,
    )
    assert json.loads(response.output_text)["priority"] in ("low", "high")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ASK, "background": True}, "background"),
        ({"input": [{"type": "input_image", "image_url": "http://x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": ASK, "tools": [{"type": "web_search"}]}, None),
        ({"input": ASK, "max_output_tokens": "8"}, "max_output_tokens"),
        ({"input": ASK, "no_such_parameter": 1}, None),
        ({"input": "nul \x00 byte"}, None),
        ({"input": DEEP}, None),
        ({"input": ASK, "previous_response_id": "resp_" + "x" * 500}, "previous_response_id"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_a_400_never_a_500(stack, body, param):
    _, key = new_tenant(stack)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = client.post(
            "/v1/responses", json={"model": PLACEHOLDER_ID, **body}, headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_unknown_ids_are_404_and_a_thousand_deep_chain_is_a_400(stack, pg_url):
    tenant, key = keeping_tenant(stack)
    client = stack.openai(api_key=key)
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call("resp_does_not_exist")
    root = client.responses.create(model=PLACEHOLDER_ID, input=ASK, max_output_tokens=2)

    async def deepen() -> str:
        """1,000 stored responses, each continuing the one before (as a long-running agent's would)."""
        database = Database(pg_url)
        try:
            pool = await database.pool()
            owner = await pool.fetchrow("SELECT tenant_id, subject FROM stored_responses WHERE id = $1", root.id)
            previous = root.id
            rows = []
            for n in range(1000):
                this = f"resp_deep_{uuid.uuid4().hex}"
                item = {"type": "message", "id": f"msg_{n}", "role": "user", "status": "completed",
                        "content": [{"type": "input_text", "text": f"Step {n} of the plan."}]}  # fmt: skip
                rows.append(
                    (this, owner["tenant_id"], owner["subject"], previous, json.dumps([item]), '{"output": []}')
                )
                previous = this
            await pool.executemany(
                "INSERT INTO stored_responses (id, tenant_id, subject, previous_id, input_items, response)"
                " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
                rows,
            )
            return previous
        finally:
            await database.dispose()

    deepest = asyncio.run(deepen())
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=PLACEHOLDER_ID, input="Next step?", previous_response_id=deepest)
    assert (refused.value.body["code"], refused.value.body["param"]) == ("context_length_exceeded", "input")
