"""Hostile input over every route and parameter of the real stack: each answer a 4xx in OpenAI's
error shape naming the parameter where there is one, never a 500, a stack trace or a redirect."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from agencyllm.serving.ops.stack import EMBEDDING_ID, PLACEHOLDER_ID

pytestmark = pytest.mark.stack

CHAT = {"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": PLACEHOLDER_ID, "prompt": "hi", "max_tokens": 2}
EMBEDDING = {"model": EMBEDDING_ID, "input": "hi"}
NUL = "a\u0000b"
SURROGATE_JSON = b'"\\ud800"'  # json.dumps would refuse to write it; raw bytes reach the server


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"x": value}
    return value


def raw_with(body: dict, field: str, raw_json_value: bytes) -> bytes:
    """`body` as JSON with `field` set to a raw JSON literal (a lone surrogate, say)."""
    import json

    text = json.dumps({**body, field: "__RAW__"}).encode()
    return text.replace(b'"__RAW__"', raw_json_value)


def message_with(raw_content: bytes) -> bytes:
    return b'{"model": "placeholder", "max_tokens": 2, "messages": [{"role": "user", "content": ' + raw_content + b"}]}"


# (id, method, path, json body or raw bytes, expected status, expected param or None for "any")
OPENAI_CASES = [
    ("chat max_tokens string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat max_tokens float", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens"),
    ("chat max_tokens huge", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    (
        "chat max_completion_tokens string",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": "5"},
        400,
        "max_completion_tokens",
    ),
    ("chat stream yes", "POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("chat stream 1", "POST", "/v1/chat/completions", {**CHAT, "stream": 1}, 400, "stream"),
    ("chat n zero", "POST", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("chat n negative", "POST", "/v1/chat/completions", {**CHAT, "n": -3}, 400, "n"),
    ("chat n over setting", "POST", "/v1/chat/completions", {**CHAT, "n": 1000}, 400, "n"),
    ("chat n overflows int32", "POST", "/v1/chat/completions", {**CHAT, "n": 10**12}, 400, "n"),
    ("chat n string", "POST", "/v1/chat/completions", {**CHAT, "n": "2"}, 400, "n"),
    ("chat temperature string", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("chat temperature bool", "POST", "/v1/chat/completions", {**CHAT, "temperature": True}, 400, "temperature"),
    ("chat top_p list", "POST", "/v1/chat/completions", {**CHAT, "top_p": [1]}, 400, "top_p"),
    ("chat seed string", "POST", "/v1/chat/completions", {**CHAT, "seed": "7"}, 400, "seed"),
    ("chat logprobs number", "POST", "/v1/chat/completions", {**CHAT, "logprobs": 3}, 400, "logprobs"),
    (
        "chat top_logprobs too many",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 99},
        400,
        "top_logprobs",
    ),
    ("chat model number", "POST", "/v1/chat/completions", {**CHAT, "model": 5}, 400, "model"),
    (
        "chat stream_options string",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": "x"},
        400,
        "stream_options",
    ),
    ("chat messages string", "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat messages missing", "POST", "/v1/chat/completions", {"model": PLACEHOLDER_ID}, 400, "messages"),
    ("chat messages null", "POST", "/v1/chat/completions", {**CHAT, "messages": None}, 400, "messages"),
    ("chat messages object", "POST", "/v1/chat/completions", {**CHAT, "messages": {"role": "user"}}, 400, "messages"),
    ("completions prompt null", "POST", "/v1/completions", {**COMPLETION, "prompt": None}, 400, "prompt"),
    ("embeddings input null", "POST", "/v1/embeddings", {**EMBEDDING, "input": None}, 400, "input"),
    (
        "chat NUL in content",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": NUL}]},
        400,
        "messages.0.content",
    ),
    ("chat NUL in key", "POST", "/v1/chat/completions", {**CHAT, NUL: 1}, 400, NUL),
    (
        "chat lone surrogate in content",
        "POST",
        "/v1/chat/completions",
        message_with(SURROGATE_JSON),
        400,
        "messages.0.content",
    ),
    ("chat extra field nested 500 deep", "POST", "/v1/chat/completions", {**CHAT, "extra": nested(500)}, 400, "extra"),
    ("chat JSON nested 1000 deep", "POST", "/v1/chat/completions", b"[" * 1000 + b"]" * 1000, 400, None),
    ("chat invalid JSON", "POST", "/v1/chat/completions", b'{"model": ', 400, None),
    ("chat body not an object", "POST", "/v1/chat/completions", [CHAT], 400, None),
    ("chat invalid UTF-8", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400, None),
    (
        "completions prompt list too long",
        "POST",
        "/v1/completions",
        {**COMPLETION, "prompt": ["hi"] * 1025},
        400,
        "prompt",
    ),
    ("completions NUL in prompt", "POST", "/v1/completions", {**COMPLETION, "prompt": NUL}, 400, "prompt"),
    (
        "completions surrogate in prompt",
        "POST",
        "/v1/completions",
        raw_with(COMPLETION, "prompt", SURROGATE_JSON),
        400,
        "prompt",
    ),
    ("completions logprobs bool", "POST", "/v1/completions", {**COMPLETION, "logprobs": True}, 400, "logprobs"),
    ("completions echo string", "POST", "/v1/completions", {**COMPLETION, "echo": "yes"}, 400, "echo"),
    ("completions max_tokens string", "POST", "/v1/completions", {**COMPLETION, "max_tokens": "10"}, 400, "max_tokens"),
    ("completions n zero", "POST", "/v1/completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("completions prompt missing", "POST", "/v1/completions", {"model": PLACEHOLDER_ID}, 400, "prompt"),
    ("embeddings input list too long", "POST", "/v1/embeddings", {**EMBEDDING, "input": ["hi"] * 3000}, 400, "input"),
    ("embeddings NUL in input", "POST", "/v1/embeddings", {**EMBEDDING, "input": [NUL]}, 400, "input.0"),
    ("embeddings model number", "POST", "/v1/embeddings", {**EMBEDDING, "model": 7}, 400, "model"),
    ("embeddings dimensions string", "POST", "/v1/embeddings", {**EMBEDDING, "dimensions": "8"}, 400, "dimensions"),
    (
        "embeddings encoding_format number",
        "POST",
        "/v1/embeddings",
        {**EMBEDDING, "encoding_format": 5},
        400,
        "encoding_format",
    ),
    ("model NUL in path", "GET", "/v1/models/a%00b", None, 400, "path"),
    ("model unknown", "GET", "/v1/models/nope", None, 404, "model"),
    ("models trailing slash", "GET", "/v1/models/", None, 404, None),
    ("models trailing %2F", "GET", "/v1/models%2F", None, 404, None),
    ("chat query NUL", "POST", "/v1/chat/completions?x=%00", CHAT, 400, "x"),
]


def admin_cases(tenant: str, key_id: str) -> list[tuple]:
    base = f"/admin/v1/tenants/{tenant}"
    return [
        ("tenant name NUL", "POST", "/admin/v1/tenants", {"name": NUL}, 400, "name"),
        (
            "tenant display_name NUL",
            "POST",
            "/admin/v1/tenants",
            {"name": "ok-name", "display_name": NUL},
            400,
            "display_name",
        ),
        (
            "tenant display_name surrogate",
            "POST",
            "/admin/v1/tenants",
            raw_with({"name": "ok-name"}, "display_name", SURROGATE_JSON),
            400,
            "display_name",
        ),
        (
            "tenant group NUL",
            "POST",
            "/admin/v1/tenants",
            {"name": "ok-name", "keycloak_group": NUL},
            400,
            "keycloak_group",
        ),
        ("tenant name number", "POST", "/admin/v1/tenants", {"name": 5}, 400, "name"),
        ("tenant unknown field", "POST", "/admin/v1/tenants", {"name": "ok-name", "colour": "red"}, 400, "colour"),
        ("tenant body nested deep", "POST", "/admin/v1/tenants", {"name": "ok-name", "x": nested(300)}, 400, "x"),
        ("tenant body 1000 deep", "POST", "/admin/v1/tenants", b"[" * 1000 + b"]" * 1000, 400, None),
        ("tenant path NUL", "GET", "/admin/v1/tenants/a%00b", None, 400, "path"),
        ("tenant patch NUL", "PATCH", base, {"display_name": NUL}, 400, "display_name"),
        ("tenant patch path NUL", "PATCH", "/admin/v1/tenants/x%00", {"display_name": "x"}, 400, "path"),
        ("suspend path NUL", "POST", "/admin/v1/tenants/x%00/suspend", None, 400, "path"),
        ("quota string", "PUT", f"{base}/quota", {"tokens_per_day": "10"}, 400, "tokens_per_day"),
        ("quota negative", "PUT", f"{base}/quota", {"tokens_per_day": -1}, 400, "tokens_per_day"),
        ("quota over bigint", "PUT", f"{base}/quota", {"tokens_per_day": 2**70}, 400, "tokens_per_day"),
        ("quota rpm over int", "PUT", f"{base}/quota", {"requests_per_minute": 2**40}, 400, "requests_per_minute"),
        ("quota mode", "PUT", f"{base}/quota", {"max_tokens_mode": "maybe"}, 400, "max_tokens_mode"),
        ("quota models NUL", "PUT", f"{base}/quota", {"allowed_models": [NUL]}, 400, "allowed_models.0"),
        ("user quota sub NUL", "PUT", f"{base}/users/a%00b/quota", {"tokens_per_day": 1}, 400, "path"),
        ("user quota read sub NUL", "GET", f"{base}/users/a%00b/quota", None, 400, "path"),
        ("key name NUL", "POST", f"{base}/keys", {"name": NUL}, 400, "name"),
        (
            "key expires far future",
            "POST",
            f"{base}/keys",
            {"name": "k", "expires_at": "9999-12-31T23:59:59-05:00"},
            400,
            "expires_at",
        ),
        (
            "key expires year 1",
            "POST",
            f"{base}/keys",
            {"name": "k", "expires_at": "0001-01-01T00:00:00+14:00"},
            400,
            "expires_at",
        ),
        (
            "key expires in the past",
            "POST",
            f"{base}/keys",
            {"name": "k", "expires_at": "2001-01-01T00:00:00Z"},
            400,
            "expires_at",
        ),
        (
            "key expires_in_days string",
            "POST",
            f"{base}/keys",
            {"name": "k", "expires_in_days": "3"},
            400,
            "expires_in_days",
        ),
        (
            "key expires_in_days zero",
            "POST",
            f"{base}/keys",
            {"name": "k", "expires_in_days": 0},
            400,
            "expires_in_days",
        ),
        ("keys include_revoked", "GET", f"{base}/keys?include_revoked=perhaps", None, 400, "include_revoked"),
        ("revoke id NUL", "DELETE", "/admin/v1/keys/a%00b", None, 400, "path"),
        ("revoke not a uuid", "DELETE", "/admin/v1/keys/not-a-key", None, 404, "id"),
        ("revoke unknown", "DELETE", f"/admin/v1/keys/{uuid.uuid4()}", None, 404, "id"),
        ("usage from far future", "GET", "/admin/v1/usage?from=9999-12-31", None, 400, "from"),
        ("usage to far future", "GET", "/admin/v1/usage?to=9999-12-31", None, 400, "to"),
        ("usage from year 1", "GET", "/admin/v1/usage?from=0001-01-01T00:00:00%2B14:00", None, 400, "from"),
        ("usage to end of time", "GET", "/admin/v1/usage?to=9999-12-31T23:59:59-14:00", None, 400, "to"),
        ("usage from NUL", "GET", "/admin/v1/usage?from=%00", None, 400, "from"),
        ("usage from garbage", "GET", "/admin/v1/usage?from=yesterday", None, 400, "from"),
        ("usage tenant NUL", "GET", "/admin/v1/usage?tenant=a%00", None, 400, "tenant"),
        ("usage user NUL", "GET", "/admin/v1/usage?user=%00", None, 400, "user"),
        ("usage model NUL", "GET", "/admin/v1/usage?model=x%00", None, 400, "model"),
        ("usage group_by", "GET", "/admin/v1/usage?group_by=hour", None, 400, "group_by"),
        ("usage format", "GET", "/admin/v1/usage?format=xml", None, 400, "format"),
        ("me keys NUL name", "POST", "/admin/v1/me/keys", {"name": NUL}, 400, "name"),
        ("admin trailing slash", "GET", "/admin/v1/tenants/", None, 404, None),
    ]


def send(stack, method: str, path: str, body, key: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        content, json_body = body, None
        headers["content-type"] = "application/json"
    else:
        content, json_body = None, body
    # A raw path: httpx must not normalise `%00` or `%2F` away.
    url = httpx.URL(stack.url).copy_with(raw_path=path.encode())
    return httpx.request(
        method, url, content=content, json=json_body, headers=headers, timeout=60, follow_redirects=False
    )


def assert_clean_4xx(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.mark.parametrize("case", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_route_refuses_malformed_input(stack, case):
    _, method, path, body, status, param = case
    assert_clean_4xx(send(stack, method, path, body, stack.api_key), status, param)


@pytest.fixture(scope="module")
def admin_target(stack):
    """A tenant to aim at and one of its keys."""
    name = f"mal-{uuid.uuid4().hex[:8]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        key = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "target"}).json()
    return name, key["id"]


def test_admin_routes_refuse_malformed_input(stack, admin_target):
    failures = []
    for case in admin_cases(*admin_target):
        label, method, path, body, status, param = case
        response = send(stack, method, path, body, stack.admin_key)
        try:
            assert_clean_4xx(response, status, param)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)


def test_engine_refusal_is_a_clean_400(stack):
    # vLLM refuses these itself; they must come back as 400, settled at 0 tokens.
    for body in ({**CHAT, "temperature": -5}, {**CHAT, "messages": []}):
        response = send(stack, "POST", "/v1/chat/completions", body, stack.api_key)
        assert_clean_4xx(response, 400, None)


def test_another_tenants_key_is_not_found_like_an_unknown_one(stack, admin_target):
    tenant, key_id = admin_target
    # A tenant admin of another tenant (a Keycloak token for the stack's tenant group).
    token = stack.issuer.mint(groups=["office-stack"], realm_roles=["llm-user", "llm-tenant-admin"])
    theirs = send(stack, "DELETE", f"/admin/v1/keys/{key_id}", None, token)
    unknown_id = str(uuid.uuid4())
    unknown = send(stack, "DELETE", f"/admin/v1/keys/{unknown_id}", None, token)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["message"].replace(key_id, "ID") == unknown.json()["error"]["message"].replace(
        unknown_id, "ID"
    )
    # And the key is still live.
    with stack.admin() as admin:
        keys = admin.get(f"/admin/v1/tenants/{tenant}/keys").json()
    assert [k["revoked_at"] for k in keys if k["id"] == key_id] == [None]


def test_no_redirect_echoes_the_host_header(stack):
    for path in ("/v1/models/", "/v1/models%2F", "/admin/v1/tenants/", "/healthz/"):
        url = httpx.URL(stack.url).copy_with(raw_path=path.encode())
        response = httpx.get(url, headers={"host": "evil.example"}, follow_redirects=False, timeout=30)
        assert response.status_code != 307 and "location" not in response.headers, (path, response.status_code)
        assert "evil.example" not in response.text


def test_api_documents_are_off_by_default(stack):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{stack.url}{path}", timeout=30).status_code in (401, 404)


def test_malformed_content_length_is_400_in_openai_shape(stack):
    host, port = urlsplit(stack.url).hostname, urlsplit(stack.url).port
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.api_key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 12abc\r\nConnection: close\r\n\r\n{}"
    ).encode()
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    # The HTTP server itself may refuse it first; either way a 400, never a 500.
    assert b" 400 " in status_line, status_line
