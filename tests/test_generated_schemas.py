"""Schemas generated from one source (scripts/gen_schemas.py) are current, and the /v1 OpenAPI
document, whose request bodies are generated from the engines' request models, still describes
what it described before they were (tests/fixtures/openapi_v1_before_derivation.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from fastapi import FastAPI

from agencyllm.serving.http.openai import router

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "openapi_v1_before_derivation.json").read_text())
BODY_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}

# Bodies clients send, each valid under the document before derivation: they stay valid.
SAMPLING = {"max_tokens": 16, "n": 2, "stream": True, "temperature": 0.7, "top_p": 1, "seed": 7, "stop": ["\n", "."]}
SAMPLES = {
    "chat": [
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ],
            **SAMPLING,
        },
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stop": "END", "max_tokens": None},
    ],
    "completions": [
        {"model": "m", "prompt": "Once"},
        {"model": "m", "prompt": ["Once", "Twice"], **SAMPLING},
    ],
    "embeddings": [{"model": "m", "input": "text"}, {"model": "m", "input": ["a", "b"]}],
}


def document() -> dict:
    app = FastAPI(title="agencyllm", version="pinned")
    app.include_router(router)
    return json.loads(json.dumps(app.openapi()))


def body_schema(doc: dict, endpoint: str) -> dict:
    return doc["paths"][BODY_PATHS[endpoint]]["post"]["requestBody"]["content"]["application/json"]["schema"]


# Routes served since the document above was saved (the Responses, Files and Batch APIs, docs/api.md).
ADDED_SINCE = {
    "/v1/responses",
    "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/input_items",
    "/v1/files",
    "/v1/files/{file_id}",
    "/v1/files/{file_id}/content",
    "/v1/batches",
    "/v1/batches/{batch_id}",
    "/v1/batches/{batch_id}/cancel",
}


def without_bodies(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for endpoint in BODY_PATHS:
        body_schema(doc, endpoint).clear()
    for path in ADDED_SINCE:
        doc["paths"].pop(path, None)
    return doc


def test_the_routes_added_since_are_the_responses_files_and_batch_apis():
    assert set(document()["paths"]) - set(BEFORE["paths"]) == ADDED_SINCE


def test_generated_files_are_current():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_schemas.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_document_unchanged_but_the_request_bodies():
    assert without_bodies(document()) == without_bodies(BEFORE)


@pytest.mark.parametrize("endpoint", BODY_PATHS)
def test_bodies_document_the_same_parameters(endpoint):
    now, before = body_schema(document(), endpoint), body_schema(BEFORE, endpoint)
    assert set(now["properties"]) == set(before["properties"])
    # `model` may be left out: with one model served, the gateway serves that one.
    assert set(now["required"]) == set(before["required"]) - {"model"}


@pytest.mark.parametrize("endpoint", BODY_PATHS)
def test_what_clients_sent_stays_valid(endpoint):
    before = jsonschema.Draft202012Validator(body_schema(BEFORE, endpoint))
    now = jsonschema.Draft202012Validator(body_schema(document(), endpoint))
    for sample in SAMPLES[endpoint]:
        before.validate(sample)
        now.validate(sample)


@pytest.mark.parametrize(
    "endpoint, bad",
    [
        ("chat", {"messages": "Hi"}),
        ("chat", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}),
        ("chat", {"messages": [{"role": "user", "content": "Hi"}], "n": 0}),
        ("completions", {"prompt": "x", "top_p": 1.5}),
        ("completions", {"prompt": "x", "max_tokens": 0}),
        ("completions", {"model": "m"}),
        ("embeddings", {"input": {"text": "x"}}),
    ],
)
def test_bodies_refuse_what_the_engines_refuse(endpoint, bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(body_schema(document(), endpoint)).validate(bad)
