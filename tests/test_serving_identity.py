"""Identity through the real ingress: Keycloak-shaped tokens from the local issuer, and API keys."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import pytest
from conftest import STACK_GROUP

from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = pytest.mark.stack

CHAT = {"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def call(stack, token: str | None, *, raw_header: str | None = None) -> httpx.Response:
    headers = {}
    if raw_header is not None:
        headers["authorization"] = raw_header
    elif token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(f"{stack.v1}/chat/completions", json=CHAT, headers=headers, timeout=60)


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["realm_access"]["roles"].append("llm-platform-admin")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def _alg_none(issuer) -> str:
    return jwt.encode(issuer.claims(groups=[STACK_GROUP]), None, algorithm="none", headers={"kid": issuer.active_kid})


def _hs256_with_public_key(issuer) -> str:
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.active_kid}
    segments = [
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in (header, issuer.claims(groups=[STACK_GROUP]))
    ]
    signing_input = ".".join(segments).encode()
    mac = hmac.new(issuer.public_key_pem(), signing_input, hashlib.sha256).digest()
    return ".".join([*segments, base64.urlsafe_b64encode(mac).rstrip(b"=").decode()])


BAD_TOKENS = {
    "garbage": lambda i: "not-a-token",
    "alg none": _alg_none,
    "HS256 with the RSA public key": _hs256_with_public_key,
    "tampered payload": lambda i: _tampered(i.mint(groups=[STACK_GROUP])),
    "wrong issuer": lambda i: i.mint(groups=[STACK_GROUP], iss="https://evil.example/realms/agency"),
    "wrong audience": lambda i: i.mint(groups=[STACK_GROUP], aud=["account"]),
    "missing audience": lambda i: i.mint(groups=[STACK_GROUP], drop=["aud"]),
    "expired": lambda i: i.mint(groups=[STACK_GROUP], now=time.time() - 3600),
    "not yet valid": lambda i: i.mint(groups=[STACK_GROUP], nbf=int(time.time()) + 3600),
    "missing sub": lambda i: i.mint(groups=[STACK_GROUP], drop=["sub"]),
    "unknown kid": lambda i: i.mint(groups=[STACK_GROUP], kid="never-published"),
}


def test_keycloak_token_is_accepted(stack):
    response = call(stack, stack.issuer.mint(groups=[STACK_GROUP]))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_401_without_detail(stack, case):
    response = call(stack, BAD_TOKENS[case](stack.issuer))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    generic = call(stack, "x").json()["error"]["message"]
    assert error["message"] == generic  # the same words whatever was wrong


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
def test_missing_or_malformed_header_is_401(stack, header):
    assert call(stack, None, raw_header=header).status_code == 401


def test_user_in_no_tenant_is_403(stack):
    response = call(stack, stack.issuer.mint(groups=["group-nobody-maps"]))
    assert response.status_code == 403
    assert "tenant" in response.json()["error"]["message"]


def test_user_without_model_role_is_403(stack):
    response = call(stack, stack.issuer.mint(groups=[STACK_GROUP], realm_roles=[]))
    assert response.status_code == 403


def test_personal_key_lifecycle(stack):
    token = stack.issuer.mint(groups=[STACK_GROUP], username="keymaker")
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {token}"}, timeout=30) as me:
        created = me.post("/admin/v1/me/keys", json={"name": "laptop"})
        assert created.status_code == 201, created.text
        key, key_id = created.json()["key"], created.json()["id"]
        assert key.startswith("sk-agency-")
        assert all("key" not in k or k.get("key") is None for k in me.get("/admin/v1/me/keys").json())
        assert call(stack, key).status_code == 200
        assert me.delete(f"/admin/v1/keys/{key_id}").status_code == 200
    assert call(stack, key).status_code == 401  # revoked: refused from the next request, on every replica


def test_key_of_one_tenant_cannot_reach_another_tenants_admin_routes(stack):
    with stack.admin() as admin:
        for name in ("tenant-a", "tenant-b"):
            admin.post("/admin/v1/tenants", json={"name": name, "display_name": name, "keycloak_group": f"grp-{name}"})
    token_a = stack.issuer.mint(
        groups=["grp-tenant-a"], realm_roles=["llm-user", "llm-tenant-admin"], username="admin-a"
    )
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {token_a}"}, timeout=30) as tenant_admin:
        assert tenant_admin.get("/admin/v1/tenants/tenant-a/keys").status_code == 200
        assert tenant_admin.get("/admin/v1/tenants/tenant-b/keys").status_code == 403
        key_a = tenant_admin.post("/admin/v1/tenants/tenant-a/keys", json={"name": "svc"}).json()["key"]
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {key_a}"}, timeout=30) as service:
        assert service.get("/admin/v1/tenants/tenant-b/keys").status_code == 403
        assert service.get("/admin/v1/tenants/tenant-b/quota").status_code == 403
