"""/admin/v1/me: the caller, their remaining budget, and their personal keys."""

from __future__ import annotations

from fastapi import APIRouter, status

from agencyllm.quotas import store
from agencyllm.serving.admin.access import require_own_tenant
from agencyllm.serving.admin.keys import created_out, expiry, key_out
from agencyllm.serving.admin.schemas import KeyCreate, KeyCreated, KeyOut, Me
from agencyllm.serving.gateway.deps import CurrentPrincipal, DbSession, LedgerDep
from agencyllm.serving.gateway.errors import OpenAIError

router = APIRouter(prefix="/me", tags=["me"])


@router.get("", summary="Who am I: identity, tenant, roles and remaining budget")
async def me(principal: CurrentPrincipal, ledger: LedgerDep) -> Me:
    remaining = await ledger.remaining(principal.tenant, principal.subject) if principal.tenant else None
    return Me(
        subject=principal.subject,
        username=principal.username,
        client_id=principal.client_id,
        tenant=principal.tenant,
        roles=sorted(role.value for role in principal.roles),
        auth_method=principal.auth_method,
        key_id=principal.key_id,
        remaining=remaining,
    )


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    summary="Mint a personal key (needs a sign-in token); the key is in `key`, shown this once",
)
async def create_personal_key(body: KeyCreate, principal: CurrentPrincipal, session: DbSession) -> KeyCreated:
    if principal.auth_method != "oidc":
        # A key that mints keys would outlive its own revocation.
        raise OpenAIError(
            403, "Personal keys are minted with a sign-in token, not with an API key.", type="permission_error"
        )
    tenant = require_own_tenant(principal)
    created = await store.create_key(
        session,
        principal,
        tenant_name=tenant,
        kind="personal",
        name=body.name,
        owner_subject=principal.subject,
        owner_username=principal.username,
        expires_at=expiry(body),
        traffic_class=body.traffic_class,
    )
    return created_out(created)


@router.get("/keys", summary="List my personal keys")
async def list_personal_keys(
    principal: CurrentPrincipal, session: DbSession, include_revoked: bool = False
) -> list[KeyOut]:
    rows = await store.list_keys(
        session, owner_subject=principal.subject, kind="personal", include_revoked=include_revoked
    )
    return [key_out(key, tenant) for key, tenant in rows]
