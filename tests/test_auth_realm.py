"""The Keycloak realm file keeps the rules agencyllm's verifier depends on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REALM_FILE = Path(__file__).resolve().parent.parent / "infra" / "keycloak" / "agencyllm-realm.json"
PLACEHOLDER = re.compile(r"^\$\{[A-Z][A-Z0-9_]*\}$")


@pytest.fixture(scope="module")
def realm():
    return json.loads(REALM_FILE.read_text())


def scopes(realm):
    return {s["name"]: s for s in realm["clientScopes"]}


def mappers(scope, kind):
    return [m for m in scope.get("protocolMappers", []) if m["protocolMapper"] == kind]


def test_realm_and_roles(realm):
    assert realm["realm"] == "agency" and realm["enabled"] is True
    assert {r["name"] for r in realm["roles"]["realm"]} >= {"llm-user", "llm-tenant-admin", "llm-platform-admin"}


# Clients whose tokens call the platform; Open WebUI's sign-in and the directory reads do not.
CALLERS = {"agencyllm-gateway", "agencyllm-cli", "agencyllm-service"}


def test_every_calling_client_gets_sub_roles_groups_audience(realm):
    assert {c["clientId"] for c in realm["clients"]} == CALLERS | {"open-webui", "agencyllm-directory"}
    for client in realm["clients"]:
        assert set(client["defaultClientScopes"]) <= set(scopes(realm)), client["clientId"]
        expected = {"basic", "roles", "groups", "agencyllm"} if client["clientId"] in CALLERS else {"basic", "roles"}
        assert expected <= set(client["defaultClientScopes"]), client["clientId"]
        if client["clientId"] not in CALLERS:
            assert "agencyllm" not in client["defaultClientScopes"], "its tokens need not reach the platform"
    assert {"basic", "roles", "groups", "agencyllm"} <= set(realm["defaultDefaultClientScopes"])


def test_scope_mappers(realm):
    s = scopes(realm)
    assert {"basic", "roles", "profile", "email", "groups", "agencyllm"} <= set(s)
    assert mappers(s["basic"], "oidc-sub-mapper")[0]["config"]["access.token.claim"] == "true"
    realm_roles = mappers(s["roles"], "oidc-usermodel-realm-role-mapper")[0]["config"]
    assert realm_roles["claim.name"] == "realm_access.roles" and realm_roles["access.token.claim"] == "true"
    group = mappers(s["groups"], "oidc-group-membership-mapper")[0]["config"]
    assert group["full.path"] == "false" and group["claim.name"] == "groups" and group["access.token.claim"] == "true"
    audience = mappers(s["agencyllm"], "oidc-audience-mapper")[0]["config"]
    assert audience.get("included.custom.audience") == "agencyllm" or audience.get("included.client.audience")
    assert audience["access.token.claim"] == "true"
    for scope in s.values():
        for m in scope.get("protocolMappers", []):
            assert all(isinstance(v, str) for v in m["config"].values()), m["name"]


def test_clients(realm):
    clients = {c["clientId"]: c for c in realm["clients"]}
    cli = clients["agencyllm-cli"]
    assert cli["publicClient"] is True and "secret" not in cli
    assert cli["attributes"]["oauth2.device.authorization.grant.enabled"] == "true"
    assert cli["standardFlowEnabled"] is False
    gateway = clients["agencyllm-gateway"]
    assert gateway["publicClient"] is False and gateway["standardFlowEnabled"] is True
    assert all(uri.startswith("${AGENCYLLM_PUBLIC_URL}") for uri in gateway["redirectUris"])
    service = clients["agencyllm-service"]
    assert service["serviceAccountsEnabled"] is True and service["publicClient"] is False
    assert service["secret"] == "${AGENCYLLM_SERVICE_CLIENT_SECRET}"
    chat = clients["open-webui"]
    assert chat["standardFlowEnabled"] is True and chat["publicClient"] is False
    assert chat["attributes"]["pkce.code.challenge.method"] == "S256"
    assert chat["redirectUris"] == ["${OPEN_WEBUI_URL}/oauth/oidc/callback"]  # Open WebUI's OIDC callback
    assert {"email", "groups"} <= set(chat["defaultClientScopes"])  # it keys accounts on the e-mail
    # Open WebUI reads roles from the ID token or userinfo (OAUTH_ROLES_CLAIM=realm_access.roles),
    # where the realm-wide roles mapper puts none.
    (roles,) = chat["protocolMappers"]
    assert roles["protocolMapper"] == "oidc-usermodel-realm-role-mapper"
    assert roles["config"]["claim.name"] == "realm_access.roles"
    assert roles["config"]["id.token.claim"] == roles["config"]["userinfo.token.claim"] == "true"
    directory = clients["agencyllm-directory"]
    assert directory["serviceAccountsEnabled"] is True and directory["standardFlowEnabled"] is False
    account = next(u for u in realm["users"] if u.get("serviceAccountClientId") == "agencyllm-directory")
    assert account["clientRoles"] == {"realm-management": ["view-users"]}  # reads users, changes nothing
    # A forwarded e-mail must name one account.
    assert realm["duplicateEmailsAllowed"] is False


def test_no_literal_secrets(realm):
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if "secret" in key.lower() or key in ("value", "password"):
                    found.append((f"{path}.{key}", value))
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(realm, "$")
    assert found, "expected client secrets as placeholders"
    for path, value in found:
        assert isinstance(value, str) and PLACEHOLDER.match(value), path
