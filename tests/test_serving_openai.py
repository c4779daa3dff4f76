"""The OpenAI API as staff use it: the official SDK against the real stack (Ray Serve + vLLM CPU)."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from agencyllm.serving.ops.stack import EMBEDDING_ID, PLACEHOLDER_ID

pytestmark = pytest.mark.stack

HELLO = [{"role": "user", "content": "Hello! Write a short answer in plain language."}]


def test_models_list_and_retrieve(stack):
    client = stack.openai()
    ids = {m.id for m in client.models.list()}
    assert {PLACEHOLDER_ID, EMBEDDING_ID} <= ids
    assert client.models.retrieve(PLACEHOLDER_ID).id == PLACEHOLDER_ID
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_chat_non_stream_reports_usage(stack):
    reply = stack.openai().chat.completions.create(model=PLACEHOLDER_ID, messages=HELLO, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_without_usage_has_no_usage_chunk(stack):
    chunks = list(
        stack.openai().chat.completions.create(model=PLACEHOLDER_ID, messages=HELLO, max_tokens=6, stream=True)
    )
    assert chunks, "no chunks streamed"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_chat_stream_with_usage_ends_with_usage_chunk(stack):
    chunks = list(
        stack.openai().chat.completions.create(
            model=PLACEHOLDER_ID, messages=HELLO, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert 0 < last.usage.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_prompt_string_and_list(stack):
    client = stack.openai()
    single = client.completions.create(model=PLACEHOLDER_ID, prompt="The agency publishes", max_tokens=5)
    assert len(single.choices) == 1 and single.usage.completion_tokens <= 5
    batch = client.completions.create(model=PLACEHOLDER_ID, prompt=["The office", "Citizens may"], max_tokens=4)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    assert batch.usage.completion_tokens <= 8


def test_completions_stream(stack):
    chunks = list(stack.openai().completions.create(model=PLACEHOLDER_ID, prompt="Hello", max_tokens=5, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_n_choices_stop_and_max_tokens(stack):
    client = stack.openai()
    reply = client.chat.completions.create(model=PLACEHOLDER_ID, messages=HELLO, max_tokens=7, n=3)
    assert len(reply.choices) == 3
    assert reply.usage.completion_tokens <= 21
    for choice in reply.choices:
        assert choice.finish_reason in {"length", "stop"}
    # A stop string the model emits often: the text never contains it.
    text = (
        client.completions.create(model=PLACEHOLDER_ID, prompt="Hello", max_tokens=40, seed=7, temperature=1)
        .choices[0]
        .text
    )
    stop = text[len(text) // 2 : len(text) // 2 + 2] if len(text) > 4 else "e"
    stopped = client.completions.create(
        model=PLACEHOLDER_ID, prompt="Hello", max_tokens=40, seed=7, temperature=1, stop=[stop]
    )
    assert stop not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_seed_gives_identical_output(stack):
    client = stack.openai()
    kwargs = dict(model=PLACEHOLDER_ID, messages=HELLO, max_tokens=12, seed=1234, temperature=1.0)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_embeddings_single_batch_float_and_base64(stack):
    client = stack.openai()
    one = client.embeddings.create(model=EMBEDDING_ID, input="Citizens may request records.")
    vector = one.data[0].embedding
    assert len(vector) == 384  # all-MiniLM-L6-v2
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-3  # normalised, as sentence-transformers does
    batch = client.embeddings.create(model=EMBEDDING_ID, input=["first text", "second text", "third"])
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{stack.v1}/embeddings",
        json={"model": EMBEDDING_ID, "input": "Citizens may request records.", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=60,
    ).json()
    decoded = struct.unpack(f"<{len(vector)}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vector, strict=True)) < 1e-5


def test_real_embeddings_are_semantic(stack):
    client = stack.openai()
    texts = ["How do I request public records?", "Filing a freedom of information request", "The cat sat on the mat"]
    vectors = [d.embedding for d in client.embeddings.create(model=EMBEDDING_ID, input=texts).data]

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.1


def test_chat_model_refuses_embeddings(stack):
    with pytest.raises(openai.BadRequestError):
        stack.openai().embeddings.create(model=PLACEHOLDER_ID, input="x")
