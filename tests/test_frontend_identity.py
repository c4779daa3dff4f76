"""Front-end keys: a trusted chat front end acts for the person it forwards, found in the realm's
directory (Keycloak's admin API, served here by the local issuer); nobody else can claim a person."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import jwt
import pytest
from oidc_issuer import LocalOIDCIssuer
from pydantic import SecretStr

from agencyllm.auth.directory import DirectoryUnavailable, KeycloakDirectory
from agencyllm.quotas import store
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.identity import FORWARDED_EMAIL_HEADER, FORWARDED_JWT_HEADER, Authenticator
from agencyllm.serving.settings import Settings

ACTOR = store.SystemActor()
DIRECTORY_CLIENT, DIRECTORY_SECRET = "agencyllm-directory", "directory-secret"


@pytest.fixture
def issuer(fresh_oidc_issuer: LocalOIDCIssuer) -> LocalOIDCIssuer:
    fresh_oidc_issuer.add_directory_client(DIRECTORY_CLIENT, DIRECTORY_SECRET)
    return fresh_oidc_issuer


@pytest.fixture
async def auth(pg_db, issuer) -> AsyncIterator[Authenticator]:
    settings = Settings(
        oidc_issuer=issuer.issuer,
        oidc_directory_client_id=DIRECTORY_CLIENT,
        oidc_directory_client_secret=SecretStr(DIRECTORY_SECRET),
    )
    authenticator = Authenticator.from_settings(settings, pg_db)
    yield authenticator
    await authenticator.aclose()


async def new_tenant(pg_db, status: str = "active") -> tuple[str, str]:
    name, group = f"fe-{uuid.uuid4().hex[:10]}", f"office-{uuid.uuid4().hex[:6]}"
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name, keycloak_group=group)
        if status != "active":
            await store.set_tenant_status(session, ACTOR, name, status)
    return name, group


async def frontend_key(pg_db, serves: list[str]) -> str:
    async with pg_db.sessions() as session:
        await store.ensure_tenant(session, ACTOR, store.SYSTEM_TENANT, "Platform")
        created = await store.create_key(
            session, ACTOR, tenant_name=store.SYSTEM_TENANT, kind="frontend", name="chat", serves_tenants=serves
        )
    return created.secret


def person(issuer: LocalOIDCIssuer, group: str, **options) -> str:
    username = f"p{uuid.uuid4().hex[:8]}"
    issuer.add_user(username, "pw", groups=[f"/agency/{group}"], **options)
    return username


async def refused(auth: Authenticator, header: str, forwarded: dict[str, str] | None) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        await auth.authenticate(header, forwarded)
    return caught.value


async def test_the_forwarded_person_is_the_caller(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    username = person(issuer, group)
    forwarded = {FORWARDED_EMAIL_HEADER: f"  {username.upper()}@agency.example "}
    principal = await auth.authenticate(f"Bearer {key}", forwarded)
    assert (principal.subject, principal.username, principal.tenant) == (issuer.subject_of(username), username, tenant)
    assert principal.auth_method == "frontend" and principal.may_call_models and not principal.is_platform_admin
    assert principal.key_id is not None


async def test_a_signed_identity_is_checked_with_the_front_end_key(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    username = person(issuer, group)
    claims = {"sub": "owui-1", "email": f"{username}@agency.example", "name": "P", "role": "user", "iss": "open-webui"}

    def signed(secret: str = key, **changes) -> dict[str, str]:
        payload = claims | {"iat": int(time.time()), "exp": int(time.time()) + 300} | changes
        # A plain e-mail header beside the JWT is not read: the signed claims win.
        return {FORWARDED_JWT_HEADER: jwt.encode(payload, secret, algorithm="HS256"), FORWARDED_EMAIL_HEADER: "x@y.z"}

    assert (await auth.authenticate(f"Bearer {key}", signed())).subject == issuer.subject_of(username)
    for bad in (signed("another-secret-of-at-least-32-bytes!"), signed(exp=int(time.time()) - 60), signed(iss="x")):
        error = await refused(auth, f"Bearer {key}", bad)
        assert error.status == 401 and error.audit_reason == "invalid_forwarded_identity"


@pytest.mark.parametrize(
    ("forwarded", "status", "code"),
    [
        ({}, 401, "missing_forwarded_identity"),
        ({FORWARDED_EMAIL_HEADER: "   "}, 401, "missing_forwarded_identity"),
        ({FORWARDED_EMAIL_HEADER: "not-an-address"}, 400, "invalid_forwarded_identity"),
        ({FORWARDED_EMAIL_HEADER: "a\x00b@agency.example"}, 400, "invalid_forwarded_identity"),
        ({FORWARDED_EMAIL_HEADER: "a" * 400 + "@agency.example"}, 400, "invalid_forwarded_identity"),
        ({FORWARDED_EMAIL_HEADER: "nobody@agency.example"}, 403, "unknown_person"),
        (None, 403, "frontend_key_misused"),  # the admin API and the console pass no forwarded headers
    ],
)
async def test_a_front_end_key_without_a_known_person_is_refused(pg_db, issuer, auth, forwarded, status, code):
    tenant, _ = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    error = await refused(auth, f"Bearer {key}", forwarded)
    assert (error.status, error.code) == (status, code)


async def test_people_the_key_does_not_serve_or_may_not_call_are_refused(pg_db, issuer, auth):
    served, served_group = await new_tenant(pg_db)
    other, other_group = await new_tenant(pg_db)
    suspended, suspended_group = await new_tenant(pg_db, status="suspended")
    key = await frontend_key(pg_db, [served, suspended])

    async def outcome(username: str) -> tuple[int, str | None]:
        error = await refused(auth, f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{username}@agency.example"})
        return error.status, error.code

    assert await outcome(person(issuer, other_group)) == (403, "tenant_not_served")
    assert await outcome(person(issuer, served_group, enabled=False)) == (403, "unknown_person")
    assert await outcome(person(issuer, "no-such-group")) == (403, "tenant_unavailable")
    assert await outcome(person(issuer, suspended_group)) == (403, "tenant_unavailable")
    # Two accounts with one e-mail (a realm that allows duplicates): nobody can tell which is meant.
    issuer.add_user("twin-a", "pw", groups=[served_group], email="twin@agency.example")
    issuer.add_user("twin-b", "pw", groups=[served_group], email="twin@agency.example")
    assert await outcome("twin") == (403, "unknown_person")
    # A person without the model role is a caller who may not call models (the gateway's 403).
    no_role = person(issuer, served_group, realm_roles=[])
    principal = await auth.authenticate(f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{no_role}@agency.example"})
    assert not principal.may_call_models


async def test_a_key_for_every_tenant_serves_each(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, ["*"])
    username = person(issuer, group)
    principal = await auth.authenticate(f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{username}@agency.example"})
    assert principal.tenant == tenant


async def test_forwarded_headers_never_change_another_credential(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    victim = person(issuer, group)
    spoof = {FORWARDED_EMAIL_HEADER: f"{victim}@agency.example", FORWARDED_JWT_HEADER: "x.y.z"}
    async with pg_db.sessions() as session:
        personal = await store.create_key(
            session, ACTOR, tenant_name=tenant, kind="personal", name="mine", owner_subject="me-1", owner_username="me"
        )
        service = await store.create_key(session, ACTOR, tenant_name=tenant, kind="service", name="svc")
    assert (await auth.authenticate(f"Bearer {personal.secret}", spoof)).subject == "me-1"
    assert (await auth.authenticate(f"Bearer {service.secret}", spoof)).subject == f"service:{service.key.id}"
    token = issuer.mint(username="someone", groups=[group])
    assert (await auth.authenticate(f"Bearer {token}", spoof)).username == "someone"


async def test_revoked_front_end_key_is_refused_like_any_key(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    username = person(issuer, group)
    async with pg_db.sessions() as session:
        keys = await store.list_keys(session, tenant_name=store.SYSTEM_TENANT, kind="frontend")
        await store.revoke_key(session, ACTOR, next(k.id for k, _ in keys if k.prefix in key))
    error = await refused(auth, f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{username}@agency.example"})
    assert error.status == 401


async def test_directory_down_is_503_with_retry_after_and_lookups_are_reused(pg_db, issuer, auth):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    known, unknown = person(issuer, group), person(issuer, group)
    forwarded = {FORWARDED_EMAIL_HEADER: f"{known}@agency.example"}
    await auth.authenticate(f"Bearer {key}", forwarded)
    asked = issuer.directory_requests
    await auth.authenticate(f"Bearer {key}", forwarded)
    assert issuer.directory_requests == asked, "the second request asked the directory again"
    issuer.stop()
    assert (await auth.authenticate(f"Bearer {key}", forwarded)).username == known  # from the cache
    error = await refused(auth, f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{unknown}@agency.example"})
    assert (error.status, error.code) == (503, "directory_unavailable")
    assert int(error.headers["Retry-After"]) >= 1


async def test_without_a_directory_front_end_keys_are_refused(pg_db, issuer):
    tenant, group = await new_tenant(pg_db)
    key = await frontend_key(pg_db, [tenant])
    auth = Authenticator.from_settings(Settings(oidc_issuer=issuer.issuer), pg_db)
    try:
        error = await refused(
            auth, f"Bearer {key}", {FORWARDED_EMAIL_HEADER: f"{person(issuer, group)}@agency.example"}
        )
        assert (error.status, error.code) == (403, "no_directory")
        assert "AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID" in error.message
    finally:
        await auth.aclose()


async def test_directory_with_a_wrong_secret_is_unavailable_not_empty(issuer):
    directory = KeycloakDirectory(issuer.issuer, DIRECTORY_CLIENT, "wrong")
    try:
        with pytest.raises(DirectoryUnavailable):
            await directory.person_by_email("jdoe@agency.example")
    finally:
        await directory.aclose()


async def test_directory_claims_resolve_like_a_token(issuer):
    issuer.add_user("ada", "pw", realm_roles=["llm-user", "llm-tenant-admin"], groups=["/agency/office-a"])
    directory = KeycloakDirectory(issuer.issuer, DIRECTORY_CLIENT, DIRECTORY_SECRET)
    try:
        found = await directory.person_by_email("ADA@agency.example")
    finally:
        await directory.aclose()
    assert found is not None and found.subject == issuer.subject_of("ada")
    claims = found.claims()
    token = issuer.claims(username="ada", groups=["/agency/office-a"], realm_roles=["llm-user", "llm-tenant-admin"])
    assert claims["sub"] == token["sub"] and claims["groups"] == token["groups"]
    assert set(token["realm_access"]["roles"]) <= set(claims["realm_access"]["roles"])


@pytest.mark.parametrize(
    ("serves", "message"),
    [
        ([], "non-empty"),
        (["*", "x"], "stands alone"),
        ([store.SYSTEM_TENANT], "no people"),
        (["no-such-tenant"], "no-such-tenant"),
    ],
)
async def test_front_end_key_tenants_are_checked(pg_db, serves, message):
    async with pg_db.sessions() as session:
        await store.ensure_tenant(session, ACTOR, store.SYSTEM_TENANT, "Platform")
        with pytest.raises((store.Invalid, store.NotFound), match=message):
            await store.create_key(
                session, ACTOR, tenant_name=store.SYSTEM_TENANT, kind="frontend", name="chat", serves_tenants=serves
            )


async def test_front_end_keys_live_in_the_system_tenant_only(pg_db):
    tenant, _ = await new_tenant(pg_db)
    async with pg_db.sessions() as session:
        with pytest.raises(store.Invalid, match="system"):
            await store.create_key(session, ACTOR, tenant_name=tenant, kind="frontend", name="x", serves_tenants=["*"])
        with pytest.raises(store.Invalid, match="serves"):
            await store.create_key(session, ACTOR, tenant_name=tenant, kind="service", name="x", serves_tenants=["*"])
