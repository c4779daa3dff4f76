"""Files and batches as document pipelines use them: the official `openai` SDK against the real
stack (two ingress replicas, each running batch lines; vLLM CPU; Postgres).

From upload to downloaded output, the input checked line by line before a batch starts, cancel,
a quota that runs out in the middle (the rest waits, nothing fails), the completion window ending,
and each line charged exactly once (its own ledger row).
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import openai
import pytest
from test_serving_quotas import ledger_rows, new_tenant

from agencyllm.quotas.db import Database
from agencyllm.serving.ops.stack import EMBEDDING_ID, PLACEHOLDER_ID

pytestmark = pytest.mark.stack

DONE = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, max_tokens: int = 4, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": f"Summarise memo {custom_id}."}],
                 "max_tokens": max_tokens, "ignore_eos": True, **body},
    }  # fmt: skip


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(client: openai.OpenAI, content: bytes, name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="batch").id


def wait(client: openai.OpenAI, batch_id: str, until=DONE, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s: {batch.request_counts}"
        time.sleep(0.5)


def records(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def test_a_file_is_uploaded_listed_read_and_deleted_by_its_owner_only(stack):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    content = jsonl([chat_line("a"), chat_line("b")])
    uploaded = client.files.create(file=("memos.jsonl", io.BytesIO(content)), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(content), "memos.jsonl", "batch")
    assert uploaded.expires_at is not None  # batch files: 30 days
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.retrieve(uploaded.id).bytes == len(content)
    assert client.files.content(uploaded.id).content == content
    _, stranger_key = new_tenant(stack)
    stranger = stack.openai(api_key=stranger_key)
    for call in (stranger.files.retrieve, stranger.files.content, stranger.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(uploaded.id)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({"file": ("x.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00binary")}, {"purpose": "batch"}, 400, "file"),
        ({"file": ("x.jsonl", b'{"a": 1}\n')}, {"purpose": "fine-tune"}, 400, "purpose"),
        ({}, {"purpose": "batch"}, 400, "file"),
        ({"file": ("x.jsonl", b"")}, {"purpose": "batch"}, 400, "file"),
        ({"file": ("big.jsonl", b"x" * (8 * 1024 * 1024 + 1))}, {"purpose": "user_data"}, 413, None),
        (
            {"file": ("x.jsonl", b"{}\n")},
            {"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "10"},
            400,
            "expires_after.seconds",
        ),  # fmt: skip
    ],
)
def test_bad_uploads_are_refused(stack, files, data, status, param):
    _, key = new_tenant(stack)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = client.post("/v1/files", files=files, data=data, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == status, response.text
    if param is not None:
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("filename", "purpose"), [(b"memo\x00.jsonl", b"batch"), (b"memo.jsonl", b"bat\x00ch")])
def test_nul_bytes_and_bad_encodings_in_the_multipart_envelope_are_a_400(stack, filename, purpose):
    _, key = new_tenant(stack)
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n{}\n\r\n--xyz--\r\n"
    )
    headers = {"authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=xyz"}
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        response = client.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_tenant_s_files_stay_within_its_storage_quota(stack):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    chunk = b"y" * (7 * 1024 * 1024)
    for _ in range(3):  # 21 MB of the 24 MB the test stack allows each tenant
        client.files.create(file=("part.bin", io.BytesIO(chunk)), purpose="user_data")
    with pytest.raises(openai.APIStatusError) as full:
        client.files.create(file=("part.bin", io.BytesIO(chunk)), purpose="user_data")
    assert full.value.status_code == 413 and full.value.body["code"] == "storage_quota_exceeded"


def test_the_input_is_checked_line_by_line_before_the_batch_starts(stack):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    content = b"\n".join(
        [
            json.dumps(chat_line("one")).encode(),
            b'{"custom_id": "two", "method": "POST", "url": ',
            json.dumps({**chat_line("three"), "body": {"model": "no-such-model", "messages": []}}).encode(),
            json.dumps({**chat_line("four"), "url": "/v1/embeddings"}).encode(),
            json.dumps(chat_line("one")).encode(),
        ]
    )
    batch = client.batches.create(
        input_file_id=upload(client, content), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json"),
        (3, "model_not_found"),
        (4, "mismatched_url"),
        (5, "duplicate_custom_id"),
    ]
    assert all(e.message.startswith(f"Line {e.line}:") for e in batch.errors.data)


def test_more_than_fifty_thousand_lines_are_refused_naming_the_line(stack):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    line = json.dumps({"custom_id": "{}", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    content = "".join(line.replace("{}", str(n)) + "\n" for n in range(50_001)).encode()
    batch = client.batches.create(
        input_file_id=upload(client, content), endpoint="/v1/embeddings", completion_window="24h"
    )
    assert batch.status == "failed"
    ((error),) = batch.errors.data
    assert (error.line, error.code) == (50_001, "too_many_requests")


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": "/v1/images/generations", "completion_window": "24h"},
        {"endpoint": "/v1/chat/completions", "completion_window": "1h"},
        {"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "file-nope"},
        {"endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"k": 1}},
        {"endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": json.loads("[" * 70 + "]" * 70)},
        {"endpoint": "/v1/chat/\u0000completions", "completion_window": "24h"},
        {"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": ["file-a"]},
    ],
)
def test_bad_batch_requests_are_4xx(stack, body):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    body = {"input_file_id": upload(client, jsonl([chat_line("a")])), **body}
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        response = http.post("/v1/batches", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["message"]


def test_another_tenant_s_file_and_batch_ids_are_not_found(stack):
    _, key = new_tenant(stack)
    owner = stack.openai(api_key=key)
    file_id = upload(owner, jsonl([chat_line("a")]))
    batch = owner.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    _, stranger_key = new_tenant(stack)
    stranger = stack.openai(api_key=stranger_key)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (stranger.batches.retrieve, stranger.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call(batch.id)
    assert batch.id not in [b.id for b in stranger.batches.list()]
    wait(owner, batch.id)


def test_a_batch_runs_from_upload_to_downloaded_output_each_line_charged_once(stack, pg_url):
    tenant, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    lines = [chat_line(f"memo-{n}") for n in range(12)]
    # Refused when it runs (the engine's request model: top_logprobs needs logprobs): an error line, not a failed batch.
    lines.append(chat_line("refused", logprobs=False, top_logprobs=3))
    batch = client.batches.create(
        input_file_id=upload(client, jsonl(lines)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "annual report"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 13
    done = wait(client, batch.id)
    assert done.status == "completed" and done.metadata == {"project": "annual report"}
    assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
    output, errors = records(client, done.output_file_id), records(client, done.error_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(f"memo-{n}" for n in range(12))
    assert all(r["response"]["status_code"] == 200 and r["response"]["body"]["choices"] for r in output)
    ((error),) = errors
    assert error["custom_id"] == "refused" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "top_logprobs"
    rows = asyncio.run(ledger_rows(pg_url, tenant))
    ours = sorted(r["request_id"] for r in rows if r["request_id"].startswith(batch.id))
    assert ours == sorted(r["response"]["request_id"] for r in output)  # one row per line that ran
    assert error["response"]["request_id"] not in ours  # refused before admission: nothing charged
    assert done.usage.output_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in output)
    assert batch.id in [b.id for b in client.batches.list()]


def test_embeddings_and_responses_batches(stack):
    _, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    embed = [{"custom_id": f"e{n}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBEDDING_ID, "input": f"text {n}"}} for n in range(3)]  # fmt: skip
    asked = {"model": PLACEHOLDER_ID, "max_output_tokens": 4}
    respond = [{"custom_id": f"r{n}", "method": "POST", "url": "/v1/responses",
                "body": {**asked, "input": f"Question {n}"}} for n in range(3)]  # fmt: skip
    first = client.batches.create(
        input_file_id=upload(client, jsonl(embed)), endpoint="/v1/embeddings", completion_window="24h"
    )
    second = client.batches.create(
        input_file_id=upload(client, jsonl(respond)), endpoint="/v1/responses", completion_window="24h"
    )
    for batch, check in ((first, lambda b: len(b["data"][0]["embedding"]) == 384), (second, lambda b: b["output"])):
        done = wait(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3, done
        assert all(check(r["response"]["body"]) for r in records(client, done.output_file_id))


def test_cancel_stops_within_seconds_and_keeps_the_finished_lines(stack, pg_url):
    tenant, key = new_tenant(stack)
    client = stack.openai(api_key=key)
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line(f"l{n}", max_tokens=64) for n in range(300)])),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    deadline = time.monotonic() + 180
    while client.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    asked = time.monotonic()
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait(client, batch.id, until=("cancelled",), timeout=60)
    took = time.monotonic() - asked
    assert took < 20, f"cancel took {took:.1f} s"
    output = records(client, done.output_file_id)
    assert len(output) == done.request_counts.completed < 300
    assert len({r["custom_id"] for r in output}) == len(output)
    time.sleep(2)  # settlements of lines that were running when the cancel came
    rows = [r for r in asyncio.run(ledger_rows(pg_url, tenant)) if r["request_id"].startswith(batch.id)]
    assert {r["request_id"] for r in rows} >= {r["response"]["request_id"] for r in output}
    assert len(rows) == len({r["request_id"] for r in rows})  # never charged twice


def test_a_spent_quota_makes_the_rest_wait_and_the_window_end_expires_them(stack, pg_url):
    tenant, key = new_tenant(stack, tokens_per_day=400)
    client = stack.openai(api_key=key)
    batch = client.batches.create(
        input_file_id=upload(client, jsonl([chat_line(f"q{n}", max_tokens=16) for n in range(20)])),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    time.sleep(20)
    waiting = client.batches.retrieve(batch.id)
    assert waiting.status == "in_progress" and waiting.request_counts.failed == 0, waiting
    assert 0 < waiting.request_counts.completed < 20, waiting.request_counts

    async def window_ends() -> None:
        database = Database(pg_url)
        try:
            await (await database.pool()).execute(
                "UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = $1", batch.id
            )
        finally:
            await database.dispose()

    asyncio.run(window_ends())
    done = wait(client, batch.id, timeout=60)
    assert done.status == "expired"
    output, errors = records(client, done.output_file_id), records(client, done.error_file_id)
    assert len(output) == waiting.request_counts.completed
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(r["custom_id"] for r in output + errors) == sorted(f"q{n}" for n in range(20))
    rows = [r for r in asyncio.run(ledger_rows(pg_url, tenant)) if r["request_id"].startswith(batch.id)]
    assert len(rows) == len(output) and sum(r["total_tokens"] for r in rows) <= 400
