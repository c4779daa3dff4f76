"""A bounded property-based run (schemathesis) over the platform's own OpenAPI document, against
the real stack: valid and invalid requests for every operation, and not one server error.

The stack serves no /openapi.json (off by default); the document comes from an app instance built
here with docs on, from the same routes. For the run, generated requests stay small: at most a
few tokens per call, so the engines are not kept busy, and nothing is aimed at the tenants other
tests use."""

from __future__ import annotations

import copy

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from agencyllm.serving.http.app import create_app

pytestmark = [pytest.mark.stack, pytest.mark.fault]

EXAMPLES_PER_OPERATION = 12
PROTECTED_TENANTS = {"stack", "system"}


def openapi_document() -> dict:
    from agencyllm.serving.http.openai import router  # the routes only: no gateway behind them

    app = create_app(cors_origins=[], max_request_bytes=256 * 1024, api_docs=True)
    app.include_router(router)
    return app.openapi()


def bounded_for_the_run(document: dict) -> dict:
    """A copy whose generated bodies ask for little work: max_tokens ≤ 4 and n ≤ 2."""
    document = copy.deepcopy(document)
    for path in ("/v1/chat/completions", "/v1/completions"):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema["properties"]["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 4}
        schema["properties"]["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        schema["required"] = [*schema["required"], "max_tokens"]
    return document


def test_document_describes_errors_of_every_v1_route():
    document = openapi_document()
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            assert {"401", "503"} <= set(operation["responses"]), path
            schema = operation["responses"]["401"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}


@pytest.fixture
def api_schema(stack):
    return schemathesis.openapi.from_dict(bounded_for_the_run(openapi_document()))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_is_a_server_error(case, stack):
    if case.path_parameters and PROTECTED_TENANTS & set(map(str, case.path_parameters.values())):
        return
    if case.method.upper() == "DELETE" and case.path.startswith("/admin/v1/tenants"):
        return  # deleting tenants at random would take other tests' tenants with it
    key = stack.api_key if case.path.startswith("/v1/") else stack.admin_key
    response = case.call(base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code < 500 or response.status_code == 503 and "retry-after" in response.headers, (
        f"{case.method} {case.formatted_path} → {response.status_code}: {response.text[:500]}"
    )
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
