"""identity_from_claims, Principal permissions and API keys."""

from __future__ import annotations

import pytest
from oidc_issuer import LocalOIDCIssuer

from agencyllm.auth.apikeys import (
    hash_key,
    looks_like_api_key,
    mint_key,
    parse_key,
    verify_key_hash,
)
from agencyllm.auth.principal import Principal, Role, RoleNames, identity_from_claims


def claims(**overrides):
    base = {
        "sub": "u-1",
        "preferred_username": "jdoe",
        "azp": "agencyllm-cli",
        "realm_access": {"roles": ["offline_access", "llm-user"]},
        "groups": ["office-a"],
    }
    base.update(overrides)
    return base


def test_identity_from_keycloak_token_layout():
    issuer = LocalOIDCIssuer()  # claims only: no server needed
    identity = identity_from_claims(issuer.claims(realm_roles=["llm-user", "llm-tenant-admin"], groups=["office-a"]))
    assert identity.username == "jdoe"
    assert identity.client_id == "agencyllm-cli"
    assert identity.roles == {Role.USER, Role.TENANT_ADMIN}
    assert identity.tenant_hints == ("office-a",)


def test_roles_mapping_and_custom_names():
    assert identity_from_claims(claims()).roles == {Role.USER}
    assert identity_from_claims(claims(realm_access={"roles": ["llm-platform-admin"]})).roles == {Role.PLATFORM_ADMIN}
    assert identity_from_claims(claims(realm_access=None)).roles == frozenset()
    assert identity_from_claims(claims(realm_access={"roles": "llm-user"})).roles == {Role.USER}
    names = RoleNames(user="ai-user", tenant_admin="ai-office-admin", platform_admin="ai-admin")
    identity = identity_from_claims(
        claims(realm_access={"roles": ["ai-user", "ai-admin", "llm-user"]}), role_names=names
    )
    assert identity.roles == {Role.USER, Role.PLATFORM_ADMIN}


def test_group_names_and_paths():
    identity = identity_from_claims(claims(groups=["/agency/office-a", "office-a", "/agency/office-b/", "/top", "", 7]))
    assert identity.tenant_hints == ("/agency/office-a", "office-a", "/agency/office-b", "office-b", "/top", "top")
    assert identity_from_claims(claims(groups=None)).tenant_hints == ()
    assert identity_from_claims(claims(groups="office-c")).tenant_hints == ("office-c",)


def test_custom_tenant_claim():
    assert identity_from_claims(claims(tenant="treasury"), tenant_claim="tenant").tenant_hints == ("treasury",)
    assert identity_from_claims(claims(tenant=["a", "b", "a"]), tenant_claim="tenant").tenant_hints == ("a", "b")
    nested = claims(org={"tenant": "justice"})
    assert identity_from_claims(nested, tenant_claim="org.tenant").tenant_hints == ("justice",)
    assert identity_from_claims(claims(), tenant_claim="tenant").tenant_hints == ()


def test_client_credentials_identity_and_missing_sub():
    identity = identity_from_claims({"sub": "svc", "client_id": "agencyllm-service"})
    assert identity.client_id == "agencyllm-service" and identity.username is None
    with pytest.raises(ValueError):
        identity_from_claims({"preferred_username": "x"})


def principal(roles, tenant="office-a"):
    return Principal(
        subject="u", username="u", client_id=None, tenant=tenant, roles=frozenset(roles), auth_method="oidc"
    )


def test_principal_permissions():
    assert not principal([]).may_call_models
    assert principal([Role.USER]).may_call_models
    assert principal([Role.TENANT_ADMIN]).may_call_models
    assert not principal([Role.USER]).may_admin_tenant("office-a")
    tenant_admin = principal([Role.TENANT_ADMIN])
    assert tenant_admin.may_admin_tenant("office-a") and not tenant_admin.may_admin_tenant("office-b")
    assert not principal([Role.TENANT_ADMIN], tenant=None).may_admin_tenant("")
    admin = principal([Role.PLATFORM_ADMIN], tenant=None)
    assert admin.is_platform_admin and admin.may_admin_tenant("anything") and admin.may_call_models
    identity = identity_from_claims(claims())
    p = Principal.from_identity(identity, "office-a")
    assert p.auth_method == "oidc" and p.tenant == "office-a" and p.roles == {Role.USER}


def test_api_key_round_trip():
    minted = mint_key()
    assert minted.key.startswith("sk-agency-" + minted.prefix + "_")
    assert len(minted.prefix) == 12 and minted.prefix.isalnum() and minted.prefix.islower()
    prefix, secret = parse_key(minted.key)
    assert prefix == minted.prefix and len(secret) >= 43
    assert minted.key_hash == hash_key(minted.key) and len(minted.key_hash) == 64
    assert verify_key_hash(minted.key, minted.key_hash)
    assert not verify_key_hash(minted.key + "x", minted.key_hash)
    assert not verify_key_hash(mint_key().key, minted.key_hash)
    assert not verify_key_hash(minted.key, "é" * 64)
    assert minted.key not in repr(minted)
    assert mint_key().prefix != minted.prefix


def test_api_key_parsing():
    good = mint_key().key
    assert looks_like_api_key(good) and looks_like_api_key("sk-agency-broken")
    assert not looks_like_api_key("eyJhbGciOi.x.y") and not looks_like_api_key(None)
    for bad in [
        "sk-agency-broken",
        "sk-agency-abcdefghijkl_short",
        "sk-agency-ABCDEFGHIJKL_" + "a" * 43,
        "sk-agency-abcdefghijk_" + "a" * 44,
        good + "!",
        "x" + good,
        good[:-1] + " ",
        good + "a" * 300,
    ]:
        assert parse_key(bad) is None, bad


def test_auth_package_is_pure_identity_logic():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, agencyllm.auth, agencyllm.auth.login\n"
        "inner = ('agencyllm.serving', 'agencyllm.quotas', 'sqlalchemy', 'asyncpg')\n"
        "bad = [m for m in sys.modules if m.startswith(inner)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    auth_dir = Path(__file__).resolve().parent.parent / "auth"
    for source in auth_dir.glob("*.py"):
        text = source.read_text()
        assert "agencyllm.serving" not in text and "agencyllm.quotas" not in text, source.name
