"""Quotas end to end: the real stack (two ingress replicas, vLLM CPU), the admin API, Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid

import httpx
import psutil
import pytest

from agencyllm.quotas.db import Database
from agencyllm.serving.ops.stack import EMBEDDING_ID, PLACEHOLDER_ID

pytestmark = pytest.mark.stack

PROMPT = [{"role": "user", "content": "Summarise the memo."}]


def new_tenant(stack, **quota) -> tuple[str, str]:
    """A tenant with `quota` and a service key for it, made through the admin API."""
    name = f"q-{uuid.uuid4().hex[:10]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name, "display_name": name}).status_code == 201
        if quota:
            response = admin.put(f"/admin/v1/tenants/{name}/quota", json=quota)
            assert response.status_code == 200, response.text
        response = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "load"})
        assert response.status_code == 201, response.text
        return name, response.json()["key"]


def chat(key: str, *, max_tokens: int = 4, stream: bool = False, model: str = PLACEHOLDER_ID, **extra) -> dict:
    return {
        "url": "/v1/chat/completions",
        "json": {
            "model": model,
            "messages": PROMPT,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": stream,
            **extra,
        },
        "headers": {"authorization": f"Bearer {key}"},
    }


def post_chat(stack, key: str, **options) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        return client.post(**chat(key, **options))


async def ledger_rows(pg_url: str, tenant: str) -> list[dict]:
    database = Database(pg_url)
    try:
        pool = await database.pool()
        rows = await pool.fetch(
            "SELECT u.request_id, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.status "
            "FROM usage_ledger u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
            tenant,
        )
        return [dict(r) for r in rows]
    finally:
        await database.dispose()


def wait_for_ledger_row(pg_url: str, tenant: str, request_id: str, timeout: float = 10) -> dict[str, dict]:
    """Streams are settled just after their last byte: give the write a moment."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["request_id"]: r for r in asyncio.run(ledger_rows(pg_url, tenant))}
        if request_id in rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _prompt_tokens(stack, key: str) -> int:
    response = post_chat(stack, key)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def _ingress_replicas_that_served(stack) -> int:
    served = 0
    for path in stack.serve_logs.glob("replica_*AgencyIngress*.log"):
        with open(path, errors="replace") as log:
            if any("POST /v1/chat/completions 200" in line for line in log):
                served += 1
    return served


def test_racing_requests_never_overshoot_the_budget(stack, pg_url):
    probe_tenant, probe_key = new_tenant(stack)
    per_request = _prompt_tokens(stack, probe_key) + 4
    budget = 50 * per_request
    tenant, key = new_tenant(stack, tokens_per_day=budget)

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=stack.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post(**chat(key)) for _ in range(300)))

    responses = asyncio.run(fire())
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.status_code == 429 for r in refused), {r.status_code for r in refused}
    assert all(r.json()["error"]["type"] == "insufficient_quota" for r in refused)
    assert 0 < len(admitted) <= 50 and len(refused) >= 250

    rows = asyncio.run(ledger_rows(pg_url, tenant))
    charged = sum(r["total_tokens"] for r in rows)
    assert len(rows) == len(admitted)
    assert charged <= budget, f"overshoot: charged {charged} of {budget}"
    assert charged == sum(r.json()["usage"]["total_tokens"] for r in admitted)
    assert _ingress_replicas_that_served(stack) >= 2


def test_client_disconnect_frees_concurrency_slot_and_is_ledgered(stack, pg_url):
    tenant, key = new_tenant(stack, max_concurrent_requests=1)
    request = chat(key, max_tokens=900, stream=True)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        with client.stream("POST", **request) as response:
            assert response.status_code == 200
            request_id = response.headers["x-agencyllm-request-id"]
            for i, _ in enumerate(response.iter_lines()):
                if i >= 3:
                    break
        # The slot is free at once: the next request is admitted, not refused.
        deadline = time.monotonic() + 10
        while True:
            follow_up = client.post(**chat(key))
            if follow_up.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert follow_up.status_code == 200, follow_up.text
    rows = wait_for_ledger_row(pg_url, tenant, request_id)
    assert rows[request_id]["status"] == "cancelled"
    assert 0 < rows[request_id]["completion_tokens"] < 900


def test_concurrency_limit_refuses_with_rate_limit(stack):
    tenant, key = new_tenant(stack, max_concurrent_requests=1)

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            return await asyncio.gather(*(client.post(**chat(key, max_tokens=900)) for _ in range(8)))

    responses = asyncio.run(race())
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 429 in statuses, statuses
    assert all(r.json()["error"]["type"] == "rate_limit_exceeded" for r in responses if r.status_code == 429)


def test_requests_per_minute(stack):
    tenant, key = new_tenant(stack, requests_per_minute=3)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        statuses = [client.post(**chat(key, max_tokens=1)).status_code for _ in range(4)]
        refused = client.post(**chat(key, max_tokens=1))
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_suspended_tenant_is_403(stack):
    tenant, key = new_tenant(stack)
    with stack.admin() as admin:
        assert admin.post(f"/admin/v1/tenants/{tenant}/suspend").status_code == 200
    response = post_chat(stack, key)
    assert response.status_code == 403
    assert "suspended" in response.json()["error"]["message"]


def test_disallowed_model_is_403(stack):
    tenant, key = new_tenant(stack, allowed_models=[EMBEDDING_ID])
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        assert client.post(**chat(key)).status_code == 403
        embedding = client.post(
            "/v1/embeddings", json={"model": EMBEDDING_ID, "input": "hi"}, headers={"authorization": f"Bearer {key}"}
        )
    assert embedding.status_code == 200


def test_max_tokens_over_cap(stack):
    _, capped_key = new_tenant(stack, max_tokens_per_request=5, max_tokens_mode="cap")
    _, strict_key = new_tenant(stack, max_tokens_per_request=5, max_tokens_mode="reject")
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        capped = client.post(**chat(capped_key, max_tokens=50))
        refused = client.post(**chat(strict_key, max_tokens=50))
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 5
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_quota_headers_on_admitted_requests(stack):
    _, key = new_tenant(stack, tokens_per_day=100_000)
    response = post_chat(stack, key)
    assert response.status_code == 200
    assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100_000


def _crash_ingress_replicas() -> int:
    """SIGKILL every ingress replica process: no handler, no finally, no goodbye (Serve restarts them)."""
    crashed = 0
    for process in psutil.process_iter(["cmdline"]):
        if "ServeReplica:agencyllm:AgencyIngress" in " ".join(process.info["cmdline"] or []):
            process.send_signal(signal.SIGKILL)
            crashed += 1
    return crashed


def test_killed_ingress_replica_is_settled_by_the_reaper(stack, pg_url):
    tenant, key = new_tenant(stack)
    client = httpx.Client(base_url=stack.url, timeout=60)
    response = client.send(client.build_request("POST", **chat(key, max_tokens=900, stream=True)), stream=True)
    assert response.status_code == 200
    request_id = response.headers["x-agencyllm-request-id"]
    # Keep the line iterator referenced: a discarded one is collected at once and closes the connection.
    lines = response.iter_lines()
    next(lines)
    assert _crash_ingress_replicas() >= 1
    # The client stays connected: only the replica's death can end this request. Its lease lapses
    # (30 s in the test stack) and a restarted replica's reaper settles it.
    rows = wait_for_ledger_row(pg_url, tenant, request_id, timeout=180)
    del lines
    with contextlib.suppress(httpx.HTTPError):
        response.close()
    client.close()
    assert request_id in rows, "the reservation of the killed replica was never settled"
    assert rows[request_id]["status"] == "expired"
    stack.stack.wait_ready(300)


def test_logs_hold_no_prompts_or_keys(stack):
    marker = f"confidential-{uuid.uuid4().hex}"
    _, key = new_tenant(stack)
    token = stack.issuer.mint(groups=["group-nobody-maps"])
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        ok = client.post(
            "/v1/chat/completions",
            json={"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": marker}], "max_tokens": 2},
            headers={"authorization": f"Bearer {key}"},
        )
        assert ok.status_code == 200
        client.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": marker}]},
            headers={"authorization": f"Bearer {key}"},
        )
        client.post("/v1/chat/completions", json={}, headers={"authorization": f"Bearer {key}x"})
        client.post("/v1/chat/completions", json={}, headers={"authorization": f"Bearer {token}"})
    time.sleep(2)  # log files are flushed asynchronously
    logs_dir = stack.serve_logs.parent
    secrets = [marker, key, key.split("_", 1)[1], token, stack.api_key, stack.admin_key]
    for path in logs_dir.rglob("*"):
        if path.is_file() and path.suffix in {".log", ".out", ".err", ""}:
            text = path.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, f"a secret reached {path.name}"
