"""Fair sharing through the real stack: traffic classes reach the engine replica's fair queue,
and a tenant's share changes nothing a lone caller can see."""

from __future__ import annotations

import asyncio

import openai
import pytest
from test_serving_quotas import PROMPT, ledger_rows, new_tenant

from agencyllm.serving.http.openai import TRAFFIC_CLASS_HEADER
from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack


def batch_key(stack, tenant: str) -> str:
    with stack.admin() as admin:
        response = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"name": "bulk", "traffic_class": "batch"})
        assert response.status_code == 201, response.text
        return response.json()["key"]


def test_batch_key_and_flex_tier_stream_and_complete(stack):
    tenant, key = new_tenant(stack)
    client = stack.openai(batch_key(stack, tenant))
    chunks = list(client.chat.completions.create(model=PLACEHOLDER_ID, messages=PROMPT, max_tokens=4, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None
    flex = stack.openai(key).chat.completions.create(
        model=PLACEHOLDER_ID, messages=PROMPT, max_tokens=3, service_tier="flex"
    )
    assert flex.usage.completion_tokens == 3
    completion = stack.openai(key).completions.create(
        model=PLACEHOLDER_ID, prompt="memo", max_tokens=2, extra_headers={TRAFFIC_CLASS_HEADER: "batch"}
    )
    assert completion.usage.completion_tokens == 2


def test_unknown_traffic_class_is_a_400_naming_the_header_before_any_reservation(stack, pg_url):
    tenant, key = new_tenant(stack, max_concurrent_requests=1)
    with pytest.raises(openai.BadRequestError) as bad:
        stack.openai(key).chat.completions.create(
            model=PLACEHOLDER_ID, messages=PROMPT, max_tokens=2, extra_headers={TRAFFIC_CLASS_HEADER: "urgent"}
        )
    assert bad.value.body["param"] == TRAFFIC_CLASS_HEADER
    assert asyncio.run(ledger_rows(pg_url, tenant)) == []  # refused before admission: nothing held
    ok = stack.openai(key).chat.completions.create(model=PLACEHOLDER_ID, messages=PROMPT, max_tokens=1)
    assert ok.usage.completion_tokens == 1  # its single concurrency slot is free


def test_a_weighted_tenant_is_served(stack):
    tenant, key = new_tenant(stack, share=4, tokens_per_day=100_000)
    reply = stack.openai(key).chat.completions.create(model=PLACEHOLDER_ID, messages=PROMPT, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    with stack.admin() as admin:
        assert admin.get(f"/admin/v1/tenants/{tenant}/quota").json()["share"] == 4
