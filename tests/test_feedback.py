"""The feedback channel end to end: staff rate a real response through the real stack, admins
list and export it (admin API and `agencyllm feedback`), bad input gets OpenAI-shaped errors."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from agencyllm.serving.cli import admin as cli_admin
from agencyllm.serving.cli import main as cli

pytestmark = pytest.mark.stack


def staff(stack, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key or stack.api_key}"})


def a_response(stack) -> str:
    with staff(stack) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "placeholder", "messages": [{"role": "user", "content": "Draft a memo."}], "max_tokens": 3},
        )
        assert response.status_code == 200, response.text
        return response.headers["x-agencyllm-request-id"]


def test_feedback_round_trip(stack, monkeypatch, capsys):
    request_id = a_response(stack)
    comment = f"Cited a regulation that does not exist ({uuid.uuid4().hex[:6]})."
    with staff(stack) as client:
        response = client.post(
            "/v1/feedback", json={"request_id": request_id, "rating": 1, "category": "inaccurate", "comment": comment}
        )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["tenant"] == stack.tenant and created["subject"] == "staff-1"
    assert created["request_id"] == request_id and created["category"] == "inaccurate"

    with stack.admin() as admin:
        listed = admin.get("/admin/v1/feedback", params={"tenant": stack.tenant}).json()
        assert any(item["id"] == created["id"] and item["comment"] == comment for item in listed)
        lines = admin.get(
            "/admin/v1/feedback", params={"tenant": stack.tenant, "format": "jsonl", "category": "inaccurate"}
        ).text.splitlines()
        assert created["id"] in [json.loads(line)["id"] for line in lines]
        csv_text = admin.get("/admin/v1/feedback", params={"format": "csv"}).text
        assert csv_text.startswith("id,created_at,tenant,request_id") and comment in csv_text
    with staff(stack) as client:  # staff cannot read the channel
        assert client.get("/admin/v1/feedback").status_code == 403

    monkeypatch.setenv("AGENCYLLM_API_KEY", stack.admin_key)
    monkeypatch.setattr(cli_admin, "client_factory", httpx.Client)
    assert cli.main(["feedback", "export", "--url", stack.url, "--tenant", stack.tenant, "--format", "jsonl"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert created["id"] in [item["id"] for item in exported]
    assert cli.main(["feedback", "list", "--url", stack.url, "--tenant", stack.tenant]) == 0
    assert "inaccurate" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"category": "rude"}, 400, "category"),
        ({"rating": 9}, 400, "rating"),
        ({"rating": "5"}, 400, "rating"),
        ({"comment": "x" * 5000}, 400, "comment"),
        ({"comment": "a\u0000b"}, 400, "comment"),
        ({"request_id": "not-a-request-of-yours", "category": "harmful"}, 404, "request_id"),
        ({"surprise": 1}, 400, "surprise"),
        ({}, 400, None),
    ],
)
def test_bad_feedback_is_refused_in_openai_shape(stack, body, status, param):
    with staff(stack) as client:
        response = client.post("/v1/feedback", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param:
        assert error["param"] == param


def test_feedback_needs_credentials_and_stays_in_the_tenant(stack):
    with httpx.Client(base_url=stack.url) as anonymous:
        assert anonymous.post("/v1/feedback", json={"category": "other", "rating": 3}).status_code == 401
    request_id = a_response(stack)
    name = f"f-{uuid.uuid4().hex[:8]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        other_key = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "x"}).json()["key"]
    with staff(stack, other_key) as client:  # another tenant cannot attach feedback to our request
        response = client.post("/v1/feedback", json={"request_id": request_id, "category": "biased"})
    assert response.status_code == 404
