"""Bad input and faults through the real stack: OpenAI error shape, right status, never a 500."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack


def post(stack, path: str, *, content: bytes | None = None, json=None, headers: dict | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {stack.api_key}", "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{stack.url}{path}", content=content, json=json, headers=headers, timeout=60)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


def test_unknown_model_is_404(stack):
    with pytest.raises(openai.NotFoundError) as err:
        stack.openai().chat.completions.create(model="gpt-nonexistent", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model"


def test_malformed_json_is_400(stack):
    error = assert_openai_error(
        post(stack, "/v1/chat/completions", content=b'{"model": "placeholder", "messages": ['), 400
    )
    assert error["code"] == "invalid_json"


def test_missing_messages_is_400(stack):
    error = assert_openai_error(post(stack, "/v1/chat/completions", json={"model": PLACEHOLDER_ID}), 400)
    assert error["param"] == "messages"


def test_wrong_type_is_400(stack):
    assert_openai_error(
        post(stack, "/v1/chat/completions", json={"model": PLACEHOLDER_ID, "messages": "hi", "max_tokens": "x"}), 400
    )


def test_prompt_longer_than_context_is_400(stack):
    long_prompt = "records " * 3000
    with pytest.raises(openai.BadRequestError) as err:
        stack.openai().chat.completions.create(
            model=PLACEHOLDER_ID, messages=[{"role": "user", "content": long_prompt}]
        )
    assert err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_non_positive_max_tokens_is_400(stack, max_tokens):
    with pytest.raises(openai.BadRequestError) as err:
        stack.openai().chat.completions.create(
            model=PLACEHOLDER_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
        )
    assert err.value.body["param"] == "max_tokens"


def test_body_over_limit_is_413(stack):
    big = {
        "model": PLACEHOLDER_ID,
        "messages": [{"role": "user", "content": "x" * (stack.settings.max_request_bytes + 10)}],
    }
    assert_openai_error(post(stack, "/v1/chat/completions", json=big), 413)


def test_body_over_limit_without_content_length_is_413(stack):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {stack.api_key}", "content-type": "application/json"},
        timeout=60,
    )
    assert_openai_error(response, 413)


def test_unknown_route_is_404_in_openai_shape(stack):
    response = httpx.get(f"{stack.url}/v1/nothing-here", headers={"authorization": f"Bearer {stack.api_key}"})
    assert_openai_error(response, 404)


def test_health_routes_need_no_credentials(stack):
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz", timeout=30).json()
    assert ready["status"] == "ready"
    assert ready["checks"]["database"] == "ok"


def test_every_other_route_needs_credentials(stack):
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/admin/v1/me"),
    ]:
        response = httpx.request(method, f"{stack.url}{path}", json={})
        assert_openai_error(response, 401)


def _cancelled_engine_calls(stack) -> int:
    logs = stack.serve_logs.glob("replica_*LLMServer*placeholder*.log")
    return sum(path.read_text(errors="replace").count("CALL chat CANCELLED") for path in logs)


def test_client_disconnect_aborts_engine_request(stack):
    before = _cancelled_engine_calls(stack)
    body = {
        "model": PLACEHOLDER_ID,
        "messages": [{"role": "user", "content": "Write a long report."}],
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{stack.v1}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 5:
                break
    # The engine call is cancelled (vLLM aborts the request) well before 900 tokens could be made.
    deadline = time.monotonic() + 30
    while _cancelled_engine_calls(stack) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cancelled_engine_calls(stack) > before, "the engine request kept running after the client left"
    assert time.monotonic() - started < 30
