"""A chat front end's key through the real ingress: each person's requests are theirs (tenant,
per-person quota, ledger row, audit record), and the front end's headers mean nothing elsewhere."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import jwt
import pytest
from conftest import STACK_GROUP
from test_serving_quotas import new_tenant

from agencyllm.quotas.db import Database
from agencyllm.serving.gateway.identity import FORWARDED_EMAIL_HEADER, FORWARDED_JWT_HEADER
from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack

HELLO = [{"role": "user", "content": "Draft a reply to the memo."}]


def mint_frontend_key(stack, serves: list[str]) -> dict:
    with stack.admin() as admin:
        response = admin.post("/admin/v1/frontend-keys", json={"name": "open-webui", "serves_tenants": serves})
    assert response.status_code == 201, response.text
    return response.json()


def person(stack, group: str = STACK_GROUP, **options) -> tuple[str, str]:
    """A realm user in `group`: (username, e-mail)."""
    username = f"p{uuid.uuid4().hex[:8]}"
    user = stack.issuer.add_user(username, "pw", groups=[f"/agency/{group}"], **options)
    return username, user.email


async def _rows(pg_url: str, sql: str, *args) -> list[dict]:
    database = Database(pg_url)
    try:
        return [dict(r) for r in await (await database.pool()).fetch(sql, *args)]
    finally:
        await database.dispose()


def ledger_and_audit(pg_url: str, request_id: str, timeout: float = 15) -> tuple[dict, dict]:
    deadline = time.monotonic() + timeout
    while True:
        ledger = asyncio.run(_rows(pg_url, "SELECT * FROM usage_ledger WHERE request_id = $1", request_id))
        audit = asyncio.run(
            _rows(pg_url, "SELECT * FROM audit_events WHERE request_id = $1 AND action = 'model.request'", request_id)
        )
        if (ledger and audit) or time.monotonic() > deadline:
            assert len(ledger) == 1 and len(audit) == 1, (ledger, audit)
            return ledger[0], audit[0]
        time.sleep(0.2)


def test_chats_through_the_front_end_key_are_each_persons_own(stack, pg_url):
    import openai

    key = mint_frontend_key(stack, [stack.tenant])
    assert key["kind"] == "frontend" and key["tenant"] == "system" and key["serves_tenants"] == [stack.tenant]
    username, email = person(stack)
    client = openai.OpenAI(
        base_url=stack.v1, api_key=key["key"], max_retries=0, default_headers={FORWARDED_EMAIL_HEADER: email}
    )
    answer = client.chat.completions.with_raw_response.create(model=PLACEHOLDER_ID, messages=HELLO, max_tokens=4)
    streamed = client.chat.completions.with_raw_response.create(
        model=PLACEHOLDER_ID, messages=HELLO, max_tokens=4, stream=True
    )
    assert [c for c in streamed.parse()], "the stream was empty"
    subject = stack.issuer.subject_of(username)
    for response in (answer, streamed):
        row, audit = ledger_and_audit(pg_url, response.headers["x-agencyllm-request-id"])
        assert (row["subject"], row["username"], str(row["key_id"])) == (subject, username, key["id"])
        assert (audit["actor_subject"], audit["actor_username"], audit["tenant"]) == (subject, username, stack.tenant)
        assert audit["actor_key_id"] == key["id"] and audit["outcome"] == "success", (row["status"], row["endpoint"])

    # The person's usage is reported under their name, like their API use.
    with stack.admin() as admin:
        report = admin.get("/admin/v1/usage", params={"tenant": stack.tenant, "group_by": "user", "user": subject})
    assert report.status_code == 200 and report.json()["rows"][0]["requests"] == 2, report.text


def test_a_persons_own_quota_holds_through_the_front_end(stack):
    tenant = f"fe-{uuid.uuid4().hex[:10]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": tenant, "keycloak_group": tenant}).status_code == 201
    key = mint_frontend_key(stack, [tenant])["key"]
    (heavy_name, heavy), (_, light) = person(stack, tenant), person(stack, tenant)
    heavy_subject = stack.issuer.subject_of(heavy_name)
    with stack.admin() as admin:
        response = admin.put(f"/admin/v1/tenants/{tenant}/users/{heavy_subject}/quota", json={"requests_per_minute": 1})
        assert response.status_code == 200, response.text

    def chat(email: str) -> httpx.Response:
        body = {"model": PLACEHOLDER_ID, "messages": HELLO, "max_tokens": 2}
        headers = {"authorization": f"Bearer {key}", FORWARDED_EMAIL_HEADER: email}
        return httpx.post(f"{stack.v1}/chat/completions", json=body, headers=headers, timeout=60)

    assert chat(heavy).status_code == 200
    refused = chat(heavy)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_exceeded", refused.text
    assert chat(light).status_code == 200, "one person's cap stopped another"


def test_identity_headers_never_change_the_caller_of_another_credential(stack, pg_url):
    username, email = person(stack)
    signed = jwt.encode({"email": email, "iss": "open-webui", "exp": int(time.time()) + 300}, stack.api_key, "HS256")
    headers = {"authorization": f"Bearer {stack.api_key}", FORWARDED_EMAIL_HEADER: email, FORWARDED_JWT_HEADER: signed}
    body = {"model": PLACEHOLDER_ID, "messages": HELLO, "max_tokens": 2}
    response = httpx.post(f"{stack.v1}/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    row, audit = ledger_and_audit(pg_url, response.headers["x-agencyllm-request-id"])
    assert row["subject"] == audit["actor_subject"] == "staff-1"  # the key's owner, not the forwarded person


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no identity", 401, "missing_forwarded_identity"),
        ("unknown person", 403, "unknown_person"),
        ("person of a tenant the key does not serve", 403, "tenant_not_served"),
        ("a forged signed identity", 401, "invalid_api_key"),
    ],
)
def test_front_end_key_refusals(stack, case, status, code):
    served, _ = new_tenant(stack)
    key = mint_frontend_key(stack, [served])["key"]
    _, stack_person = person(stack)  # of the stack's tenant, which this key does not serve
    headers = {
        "no identity": {},
        "unknown person": {FORWARDED_EMAIL_HEADER: "nobody@agency.example"},
        "person of a tenant the key does not serve": {FORWARDED_EMAIL_HEADER: stack_person},
        "a forged signed identity": {
            FORWARDED_JWT_HEADER: jwt.encode(
                {"email": stack_person, "iss": "open-webui", "exp": int(time.time()) + 300},
                "a-guess-at-the-secret-that-is-long-enough",
                "HS256",
            )
        },
    }[case]
    body = {"model": PLACEHOLDER_ID, "messages": HELLO, "max_tokens": 2}
    response = httpx.post(
        f"{stack.v1}/chat/completions", json=body, headers={"authorization": f"Bearer {key}", **headers}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}


def test_only_platform_admins_mint_front_end_keys_and_the_key_cannot_administer(stack):
    _, email = person(stack)
    body = {"name": "chat", "serves_tenants": [stack.tenant]}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        staff = client.post("/admin/v1/frontend-keys", json=body, headers={"authorization": f"Bearer {stack.api_key}"})
        assert staff.status_code == 403, staff.text
        key = mint_frontend_key(stack, [stack.tenant])["key"]
        me = client.get("/admin/v1/me", headers={"authorization": f"Bearer {key}", FORWARDED_EMAIL_HEADER: email})
        assert me.status_code == 403 and me.json()["error"]["code"] == "frontend_key_misused", me.text
    with stack.admin() as admin:
        for bad in ({"name": "x", "serves_tenants": []}, {"name": "x", "serves_tenants": ["nope"]}, {"name": "x"}):
            response = admin.post("/admin/v1/frontend-keys", json=bad)
            assert response.status_code in (400, 404, 422) and "error" in response.json(), response.text
