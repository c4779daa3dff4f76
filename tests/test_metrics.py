"""GET /metrics through the real stack: never public, and a request's tokens show up under its
tenant and model (Ray's metrics agent), with the engines' vLLM series and open reservations."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.stack


def series(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


def test_metrics_are_not_public(stack):
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/metrics").status_code == 401
        staff = client.get("/metrics", headers={"authorization": f"Bearer {stack.api_key}"})
        assert staff.status_code == 403 and staff.json()["error"]["message"]


def test_metrics_show_a_requests_tokens_under_its_tenant(stack):
    name = f"m-{uuid.uuid4().hex[:10]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        key = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "metrics"}).json()["key"]
    with httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": "placeholder",
                "messages": [{"role": "user", "content": "Count me."}],
                "max_tokens": 5,
                "ignore_eos": True,
            },
        )
    assert response.status_code == 200, response.text
    tokens = response.json()["usage"]["total_tokens"]

    deadline, text = time.monotonic() + 90, ""
    with stack.admin() as admin:
        while time.monotonic() < deadline:  # Ray's agent exports what replicas report every few seconds
            answer = admin.get("/metrics")
            assert answer.status_code == 200, answer.text
            text = answer.text
            if series(text, "ray_agencyllm_tokens_charged_total", tenant=name, model="placeholder") == tokens:
                break
            time.sleep(2)
    assert series(text, "ray_agencyllm_tokens_charged_total", tenant=name, model="placeholder") == tokens, text[-3000:]
    assert series(text, "ray_agencyllm_requests_admitted_total", tenant=name, model="placeholder") == 1
    assert series(text, "ray_agencyllm_request_duration_seconds_count", tenant=name, model="placeholder") == 1
    assert re.search(r"^ray_vllm[:_]\w+", text, re.M), "no engine (vLLM) series"
    assert re.search(r"^agencyllm_reservations_open \d+$", text, re.M)
