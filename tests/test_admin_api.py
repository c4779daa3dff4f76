"""The admin REST API over ASGI, with the real Authenticator, Ledger and Postgres.

Platform admin: the bootstrap key. Tenant admins and users: tokens from the local OIDC issuer.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from oidc_issuer import LocalOIDCIssuer
from pydantic import SecretStr
from sqlalchemy import select, update

from agencyllm.quotas.db import Database
from agencyllm.quotas.models import ApiKey, AuditEvent, Tenant, UsageRecord
from agencyllm.serving.admin import router
from agencyllm.serving.gateway.errors import install_error_handlers
from agencyllm.serving.gateway.identity import ensure_bootstrap_admin_key
from agencyllm.serving.gateway.services import Services
from agencyllm.serving.settings import Settings

ADMIN_ROLES = ("llm-user", "llm-tenant-admin")


def build_app(services: Services) -> FastAPI:
    """The admin routes over the gateway's services, as a replica serves them."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    services.install(app)
    return app


class Api:
    """An ASGI client plus the credentials the tests act with."""

    def __init__(self, app, client: httpx.AsyncClient, admin_key: str, issuer: LocalOIDCIssuer, db: Database):
        self.app = app
        self.client = client
        self.admin_key = admin_key
        self.issuer = issuer
        self.db = db

    async def call(self, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.admin_key}"}
        return await self.client.request(method, f"/admin/v1{path}", headers=headers, **kwargs)

    def token(self, *, username: str, groups=(), roles=("llm-user",)) -> str:
        return self.issuer.mint(username=username, groups=list(groups), realm_roles=list(roles))

    async def tenant(self, **fields) -> str:
        name = f"a-{uuid.uuid4().hex[:10]}"
        body = {"name": name, "keycloak_group": f"/agencies/{name}", **fields}
        response = await self.call("POST", "/tenants", json=body)
        assert response.status_code == 201, response.text
        return name

    async def service_key(self, tenant: str, **fields) -> dict:
        response = await self.call("POST", f"/tenants/{tenant}/keys", json={"name": "svc", **fields})
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
async def api(pg_url, pg_db, oidc_issuer, tmp_path_factory) -> AsyncIterator[Api]:
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings(data_dir=data_dir, oidc_issuer=oidc_issuer.issuer, database_url=SecretStr(pg_url))
    services = await Services.start(settings)
    app = build_app(services)
    path = await ensure_bootstrap_admin_key(pg_db, data_dir)
    admin_key = path.read_text().strip()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://admin.test") as client:
        yield Api(app, client, admin_key, oidc_issuer, pg_db)
    await services.aclose()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


async def test_openapi_lists_every_admin_route(api: Api):
    app = api.app
    paths = app.openapi()["paths"]
    assert {
        "/admin/v1/tenants",
        "/admin/v1/tenants/{name}/quota",
        "/admin/v1/usage",
        "/admin/v1/me/keys",
        "/admin/v1/keys/{key_id}",
    } <= set(paths)
    assert "KeyCreated" in app.openapi()["components"]["schemas"]


async def test_tenant_crud_and_bad_input(api: Api):
    name = await api.tenant(display_name="Roads Office")
    assert (await api.call("GET", f"/tenants/{name}")).json()["display_name"] == "Roads Office"
    listed = [t["name"] for t in (await api.call("GET", "/tenants")).json()]
    assert name in listed and "system" in listed

    patched = await api.call("PATCH", f"/tenants/{name}", json={"display_name": "Roads"})
    assert patched.status_code == 200 and patched.json()["keycloak_group"] == f"/agencies/{name}"

    duplicate = await api.call("POST", "/tenants", json={"name": name})
    assert duplicate.status_code == 409 and "already exists" in error_of(duplicate)["message"]
    unknown = await api.call("GET", "/tenants/no-such-tenant")
    assert unknown.status_code == 404 and error_of(unknown)["type"] == "not_found_error"
    for body in (
        {"name": "Bad Name"},
        {"name": name + "x", "display_name": 5},
        {"name": name + "y", "colour": "red"},
        {},
    ):
        bad = await api.call("POST", "/tenants", json=body)
        assert bad.status_code == 400, (body, bad.text)
        assert error_of(bad)["message"]
    async with api.db.sessions() as session:
        leftovers = await session.scalars(select(Tenant.name).where(Tenant.name.in_([name + "x", name + "y"])))
        assert list(leftovers) == []

    assert (await api.call("POST", f"/tenants/{name}/suspend")).json()["status"] == "suspended"
    assert (await api.call("POST", f"/tenants/{name}/resume")).json()["status"] == "active"
    assert (await api.call("DELETE", f"/tenants/{name}")).status_code == 204
    assert (await api.call("GET", f"/tenants/{name}")).status_code == 404


async def test_quota_put_get_and_nothing_half_written(api: Api):
    name = await api.tenant()
    good = {"tokens_per_day": 1000, "requests_per_minute": 60, "allowed_models": ["m1"]}
    put = await api.call("PUT", f"/tenants/{name}/quota", json=good)
    assert put.status_code == 200 and put.json()["tokens_per_day"] == 1000

    for bad in (
        {"tokens_per_day": -1},
        {"tokens_per_day": "many"},
        {"tokens_per_day": 1.5},
        {"tokens_per_week": 1},
        {"max_tokens_mode": "drop"},
        {"allowed_models": "m1"},
    ):
        response = await api.call("PUT", f"/tenants/{name}/quota", json=bad)
        assert response.status_code == 400, (bad, response.text)
        error = error_of(response)
        assert error["param"] and error["param"] in error["message"]
    current = (await api.call("GET", f"/tenants/{name}/quota")).json()
    assert current["tokens_per_day"] == 1000 and current["allowed_models"] == ["m1"]

    missing = await api.call("PUT", "/tenants/no-such-tenant/quota", json=good)
    assert missing.status_code == 404 and "no-such-tenant" in error_of(missing)["message"]
    user = await api.call("PUT", f"/tenants/{name}/users/sub-42/quota", json={"tokens_per_month": 5})
    assert user.json() | {"tokens_per_month": 5} == user.json() and user.json()["user"] == "sub-42"
    assert (await api.call("GET", f"/tenants/{name}/users/sub-42/quota")).json()["tokens_per_month"] == 5

    async with api.db.sessions() as session:
        events = list(
            await session.scalars(
                select(AuditEvent).where(AuditEvent.target_id == name, AuditEvent.action == "quota.set")
            )
        )
    assert len(events) == 1
    assert events[0].before is None and events[0].after["tokens_per_day"] == 1000
    assert events[0].actor_subject.startswith("service:")


async def test_service_key_use_revoke_and_expiry(api: Api):
    name = await api.tenant()
    created = await api.service_key(name)
    key = created["key"]
    assert created["kind"] == "service" and created["tenant"] == name
    listed = (await api.call("GET", f"/tenants/{name}/keys")).json()
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert all("hash" not in field for field in listed[0])

    me = await api.call("GET", "/me", key)
    assert me.status_code == 200 and me.json()["tenant"] == name and me.json()["auth_method"] == "api_key"
    assert me.json()["remaining"]["tenant"] == name

    revoked = await api.call("DELETE", f"/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    after = await api.call("GET", "/me", key)
    assert after.status_code == 401 and after.headers["www-authenticate"] == "Bearer"
    assert error_of(after)["type"] == "authentication_error"

    expiring = await api.service_key(name, expires_in_days=1)
    assert (await api.call("GET", "/me", expiring["key"])).status_code == 200
    async with api.db.sessions() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == uuid.UUID(expiring["id"]))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
    assert (await api.call("GET", "/me", expiring["key"])).status_code == 401

    both = await api.call(
        "POST", f"/tenants/{name}/keys", json={"name": "x", "expires_in_days": 1, "expires_at": "2030-01-01T00:00:00Z"}
    )
    assert both.status_code == 400


async def test_key_of_one_tenant_cannot_reach_another(api: Api):
    tenant_a, tenant_b = await api.tenant(), await api.tenant()
    key_a = (await api.service_key(tenant_a))["key"]
    for method, path in (
        ("GET", f"/tenants/{tenant_b}/keys"),
        ("GET", f"/tenants/{tenant_b}"),
        ("POST", f"/tenants/{tenant_b}/keys"),
        ("GET", f"/tenants/{tenant_b}/quota"),
        ("GET", f"/usage?tenant={tenant_b}"),
        ("POST", "/tenants"),
    ):
        response = await api.call(method, path, key_a, json={"name": "x"} if method == "POST" else None)
        assert response.status_code == 403, (method, path, response.text)
        assert error_of(response)["type"] == "permission_error"
    # A key cannot mint keys that would outlive its own revocation.
    assert (await api.call("POST", "/me/keys", key_a, json={"name": "x"})).status_code == 403


async def test_tenant_admin_scoping(api: Api):
    tenant_a, tenant_b = await api.tenant(), await api.tenant()
    admin_a = api.token(username="alice", groups=[f"/agencies/{tenant_a}"], roles=ADMIN_ROLES)

    assert [t["name"] for t in (await api.call("GET", "/tenants", admin_a)).json()] == [tenant_a]
    assert (await api.call("GET", f"/tenants/{tenant_a}/quota", admin_a)).status_code == 200
    created = await api.call("POST", f"/tenants/{tenant_a}/keys", admin_a, json={"name": "etl"})
    assert created.status_code == 201 and created.json()["created_by"]
    assert (await api.call("GET", "/usage", admin_a)).status_code == 200

    denied = [
        ("GET", f"/tenants/{tenant_b}"),
        ("GET", f"/tenants/{tenant_b}/keys"),
        ("GET", f"/tenants/{tenant_b}/quota"),
        ("GET", f"/usage?tenant={tenant_b}"),
        ("PUT", f"/tenants/{tenant_a}/quota"),
        ("POST", f"/tenants/{tenant_a}/suspend"),
        ("PATCH", f"/tenants/{tenant_a}"),
        ("DELETE", f"/tenants/{tenant_a}"),
        ("POST", "/tenants"),
        ("POST", "/tenants/system/keys"),
        ("GET", "/tenants/no-such-tenant"),
    ]
    for method, path in denied:
        response = await api.call(method, path, admin_a, json={} if method in ("PUT", "PATCH", "POST") else None)
        assert response.status_code == 403, (method, path, response.text)

    key_b = await api.service_key(tenant_b)
    # Another tenant's key is answered like an unknown one: ids cannot be probed.
    assert (await api.call("DELETE", f"/keys/{key_b['id']}", admin_a)).status_code == 404
    key_a = created.json()
    assert (await api.call("DELETE", f"/keys/{key_a['id']}", admin_a)).status_code == 200


async def test_user_personal_keys(api: Api):
    tenant = await api.tenant()
    user = api.token(username="bob", groups=[f"/agencies/{tenant}"])
    other = api.token(username="carol", groups=[f"/agencies/{tenant}"])

    me = (await api.call("GET", "/me", user)).json()
    assert me["tenant"] == tenant and me["roles"] == ["user"] and me["auth_method"] == "oidc"
    created = await api.call("POST", "/me/keys", user, json={"name": "laptop", "expires_in_days": 30})
    assert created.status_code == 201
    key = created.json()
    assert key["kind"] == "personal" and key["owner_username"] == "bob" and key["expires_at"]

    via_key = (await api.call("GET", "/me", key["key"])).json()
    assert via_key["subject"] == me["subject"] and via_key["tenant"] == tenant
    assert [k["id"] for k in (await api.call("GET", "/me/keys", user)).json()] == [key["id"]]
    assert (await api.call("GET", "/me/keys", other)).json() == []

    for method, path in (("GET", f"/tenants/{tenant}/keys"), ("GET", "/usage"), ("GET", "/tenants")):
        assert (await api.call(method, path, user)).status_code == 403, path
    assert (await api.call("DELETE", f"/keys/{key['id']}", other)).status_code == 404
    assert (await api.call("DELETE", f"/keys/{key['id']}", user)).status_code == 200
    assert (await api.call("GET", "/me", key["key"])).status_code == 401
    assert (await api.call("DELETE", f"/keys/{uuid.uuid4()}", user)).status_code == 404


async def test_suspended_tenant_key_is_refused(api: Api):
    tenant = await api.tenant()
    key = (await api.service_key(tenant))["key"]
    await api.call("POST", f"/tenants/{tenant}/suspend")
    response = await api.call("GET", "/me", key)
    assert response.status_code == 403 and "suspended" in error_of(response)["message"]
    assert (await api.call("POST", f"/tenants/{tenant}/keys", json={"name": "x"})).status_code == 409


async def test_usage_json_csv_and_scoping(api: Api):
    tenant, other = await api.tenant(), await api.tenant()
    async with api.db.sessions() as session:
        ids = dict(
            (await session.execute(select(Tenant.name, Tenant.id).where(Tenant.name.in_([tenant, other])))).all()
        )
        at = datetime(2026, 5, 4, 12, tzinfo=UTC)
        for owner, model, tokens in ((tenant, "m1", 10), (tenant, "m2", 20), (tenant, "m1", 30), (other, "m1", 99)):
            session.add(
                UsageRecord(
                    request_id=str(uuid.uuid4()),
                    tenant_id=ids[owner],
                    subject="u1",
                    username="dora",
                    model=model,
                    endpoint="chat",
                    prompt_tokens=tokens,
                    completion_tokens=1,
                    total_tokens=tokens + 1,
                    status="ok",
                    latency_ms=5.0,
                    started_at=at,
                    finished_at=at,
                )
            )
        await session.commit()

    by_model = await api.call("GET", f"/usage?tenant={tenant}&group_by=model&from=2026-05-04&to=2026-05-04")
    assert by_model.json()["rows"] == [
        {"model": "m1", "requests": 2, "prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42},
        {"model": "m2", "requests": 1, "prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
    ]
    outside = await api.call("GET", f"/usage?tenant={tenant}&from=2026-05-05")
    assert outside.json()["rows"] == []

    as_csv = await api.call("GET", f"/usage?tenant={tenant}&group_by=user&format=csv")
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert rows == [
        {
            "user": "u1",
            "username": "dora",
            "requests": "3",
            "prompt_tokens": "60",
            "completion_tokens": "3",
            "total_tokens": "63",
        }
    ]

    admin = api.token(username="erin", groups=[f"/agencies/{tenant}"], roles=ADMIN_ROLES)
    scoped = (await api.call("GET", "/usage?group_by=tenant", admin)).json()["rows"]
    assert [r["tenant"] for r in scoped] == [tenant]

    for query in ("group_by=week", "from=yesterday", "format=xml", "from=2026-05-05&to=2026-05-01"):
        response = await api.call("GET", f"/usage?{query}")
        assert response.status_code == 400, (query, response.text)
    assert (await api.call("GET", "/usage?tenant=no-such-tenant")).status_code == 404


async def test_key_actions_are_audited_without_secrets(api: Api):
    tenant = await api.tenant()
    created = await api.service_key(tenant)
    await api.call("DELETE", f"/keys/{created['id']}")
    async with api.db.sessions() as session:
        events = list(
            await session.scalars(
                select(AuditEvent).where(AuditEvent.target_id == created["id"]).order_by(AuditEvent.id)
            )
        )
    assert [e.action for e in events] == ["key.create", "key.revoke"]
    assert events[1].before["revoked_at"] is None and events[1].after["revoked_at"]
    assert created["key"] not in str([(e.before, e.after) for e in events])
    assert all("key_hash" not in (e.after or {}) for e in events)


async def test_a_quota_refusal_behind_an_admin_route_is_answered_not_a_500(api: Api):
    """`Ledger.remaining` refuses a tenant that is gone (deleted after the caller signed in):
    the one error mapping answers it on the admin routes as on the OpenAI ones."""
    from agencyllm.auth.principal import Principal, Role

    class GoneTenant:
        async def authenticate(self, authorization_header):
            return Principal(
                subject="s-gone",
                username="gone",
                client_id=None,
                tenant="no-such-tenant",
                roles=frozenset({Role.USER}),
                auth_method="api_key",
            )

    state = api.app.state
    real, state.authenticator = state.authenticator, GoneTenant()
    try:
        response = await api.call("GET", "/me")
    finally:
        state.authenticator = real
    assert response.status_code == 404, response.text
    assert error_of(response)["code"] == "tenant_not_found"
