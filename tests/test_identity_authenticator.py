"""serving/gateway/identity.py: bearer credentials to Principals, and the bootstrap admin key."""

from __future__ import annotations

import logging
import stat
import uuid
from collections.abc import AsyncIterator

import pytest
from oidc_issuer import LocalOIDCIssuer

from agencyllm.auth.oidc import OIDCVerifier
from agencyllm.auth.principal import Role
from agencyllm.quotas import store
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.identity import (
    PUBLIC_AUTH_MESSAGE,
    Authenticator,
    ensure_bootstrap_admin_key,
)
from agencyllm.serving.settings import Settings

ACTOR = store.SystemActor()


@pytest.fixture(scope="module")
async def verifier(oidc_issuer: LocalOIDCIssuer) -> AsyncIterator[OIDCVerifier]:
    verifier = OIDCVerifier(oidc_issuer.issuer, "agencyllm")
    yield verifier
    await verifier.aclose()


def authenticator(pg_db, oidc_issuer, verifier, **settings) -> Authenticator:
    return Authenticator(Settings(oidc_issuer=oidc_issuer.issuer, **settings), pg_db, verifier)


async def new_tenant(pg_db, *, group: str | None = None, status: str = "active") -> str:
    name = f"i-{uuid.uuid4().hex[:10]}"
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name, keycloak_group=group)
        if status != "active":
            await store.set_tenant_status(session, ACTOR, name, status)
    return name


async def refused(auth: Authenticator, header: str | None) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        await auth.authenticate(header)
    return caught.value


async def test_valid_token_maps_groups_to_tenant(pg_db, oidc_issuer, verifier):
    group = f"office-{uuid.uuid4().hex[:6]}"
    tenant = await new_tenant(pg_db, group=group)
    auth = authenticator(pg_db, oidc_issuer, verifier)
    token = oidc_issuer.mint(username="jdoe", groups=[f"/agencies/{group}"], realm_roles=["llm-user"])
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal.tenant == tenant and principal.username == "jdoe"
    assert principal.roles == frozenset({Role.USER}) and principal.auth_method == "oidc"
    assert principal.client_id == "agencyllm-cli"


async def test_tenant_claim_with_names(pg_db, oidc_issuer, verifier):
    tenant = await new_tenant(pg_db)
    auth = authenticator(pg_db, oidc_issuer, verifier, oidc_tenant_claim="tenant")
    token = oidc_issuer.mint(groups=[], tenant=tenant)
    assert (await auth.authenticate(f"Bearer {token}")).tenant == tenant


async def test_user_in_no_tenant_is_refused_with_reason(pg_db, oidc_issuer, verifier):
    auth = authenticator(pg_db, oidc_issuer, verifier)
    error = await refused(auth, f"Bearer {oidc_issuer.mint(groups=['/nowhere'])}")
    assert error.status == 403 and "not a member of any tenant" in error.message
    assert error.type == "permission_error"


async def test_suspended_tenant_is_refused_but_not_for_platform_admin(pg_db, oidc_issuer, verifier):
    group = f"office-{uuid.uuid4().hex[:6]}"
    tenant = await new_tenant(pg_db, group=group, status="suspended")
    auth = authenticator(pg_db, oidc_issuer, verifier)
    error = await refused(auth, f"Bearer {oidc_issuer.mint(groups=[group])}")
    assert error.status == 403 and f"'{tenant}' is suspended" in error.message
    admin = oidc_issuer.mint(groups=[group], realm_roles=["llm-platform-admin"])
    assert (await auth.authenticate(f"Bearer {admin}")).is_platform_admin


async def test_platform_admin_needs_no_tenant(pg_db, oidc_issuer, verifier):
    auth = authenticator(pg_db, oidc_issuer, verifier)
    token = oidc_issuer.mint(groups=[], realm_roles=["llm-platform-admin"])
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal.tenant is None and principal.is_platform_admin


async def test_custom_role_names(pg_db, oidc_issuer, verifier):
    group = f"office-{uuid.uuid4().hex[:6]}"
    await new_tenant(pg_db, group=group)
    auth = authenticator(pg_db, oidc_issuer, verifier, role_tenant_admin="ai-admins")
    token = oidc_issuer.mint(groups=[group], realm_roles=["ai-admins"])
    assert (await auth.authenticate(f"Bearer {token}")).roles == frozenset({Role.TENANT_ADMIN})


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer a b",
        "Bearer not-a-jwt",
        "Bearer sk-agency-abc",
        "Bearer sk-agency-aaaaaaaaaaaa_" + "A" * 43,
    ],
)
async def test_bad_credentials_get_one_generic_401(pg_db, oidc_issuer, verifier, header):
    error = await refused(authenticator(pg_db, oidc_issuer, verifier), header)
    assert error.status == 401 and error.message == PUBLIC_AUTH_MESSAGE
    assert error.type == "authentication_error" and error.headers == {"WWW-Authenticate": "Bearer"}


async def test_refusals_log_reason_but_never_the_token(pg_db, oidc_issuer, verifier, caplog):
    auth = authenticator(pg_db, oidc_issuer, verifier)
    expired = oidc_issuer.mint(lifetime=-3600)
    with caplog.at_level(logging.INFO, logger="agencyllm.identity"):
        error = await refused(auth, f"Bearer {expired}")
    assert error.status == 401 and "expired" in caplog.text
    assert expired not in caplog.text and expired.split(".")[1] not in caplog.text


async def test_without_oidc_only_api_keys_pass(pg_db, oidc_issuer):
    auth = Authenticator(Settings(), pg_db, None)
    error = await refused(auth, f"Bearer {oidc_issuer.mint()}")
    assert error.status == 401


async def test_bootstrap_admin_key(pg_db, tmp_path):
    path = await ensure_bootstrap_admin_key(pg_db, tmp_path / "data")
    assert path == tmp_path / "data" / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert key.startswith("sk-agency-")

    principal = await Authenticator(Settings(), pg_db, None).authenticate(f"Bearer {key}")
    assert principal.is_platform_admin and principal.tenant == store.SYSTEM_TENANT
    assert principal.auth_method == "api_key" and principal.key_id

    assert await ensure_bootstrap_admin_key(pg_db, tmp_path / "data") is None
    assert path.read_text().strip() == key

    async with pg_db.sessions() as session:
        await store.revoke_key(session, ACTOR, principal.key_id)
    again = await ensure_bootstrap_admin_key(pg_db, tmp_path / "data")
    assert again == path and path.read_text().strip() != key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_personal_key_carries_owner_identity(pg_db, oidc_issuer, verifier):
    tenant = await new_tenant(pg_db)
    async with pg_db.sessions() as session:
        created = await store.create_key(
            session,
            ACTOR,
            tenant_name=tenant,
            kind="personal",
            name="laptop",
            owner_subject="sub-7",
            owner_username="gina",
        )
    principal = await authenticator(pg_db, oidc_issuer, verifier).authenticate(f"Bearer {created.secret}")
    assert (principal.subject, principal.username, principal.tenant) == ("sub-7", "gina", tenant)
    assert principal.roles == frozenset({Role.USER}) and principal.key_id == str(created.key.id)
