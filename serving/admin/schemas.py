"""Request and response bodies of the admin API (they are its OpenAPI schema)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from agencyllm.quotas.models import TENANT_NAME_PATTERN
from agencyllm.quotas.store import Quota

TenantName = Annotated[str, StringConstraints(pattern=TENANT_NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_ERROR_DESCRIPTIONS = {
    400: "Invalid request (the parameter is in `error.param`)",
    401: "Missing or invalid credentials",
    403: "Not allowed for this caller or tenant",
    404: "Unknown model or object",
    413: "Request body too large",
    429: "Quota or rate limit reached (`Retry-After` when known)",
    503: "Model or database temporarily unavailable (`Retry-After`)",
}


def documented_errors(*statuses: int) -> dict:
    """OpenAPI `responses` for the errors a route can answer, all in OpenAI's error shape."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    """Every error, OpenAI's shape."""

    error: ErrorDetail


class TenantCreate(Strict):
    name: TenantName = Field(description="URL-safe id: lowercase letters, digits and '-'.")
    display_name: str | None = Field(default=None, max_length=200)
    keycloak_group: str | None = Field(
        default=None,
        max_length=255,
        description="Keycloak group name or full path (`/agency/office`) whose members belong here.",
    )


class TenantUpdate(Strict):
    """Only the fields sent are changed; `keycloak_group: null` removes the mapping."""

    display_name: str | None = Field(default=None, max_length=200)
    keycloak_group: str | None = Field(default=None, max_length=255)


class TenantOut(BaseModel):
    name: str
    display_name: str
    keycloak_group: str | None
    status: Literal["active", "suspended"]
    created_at: datetime
    updated_at: datetime


class QuotaOut(Quota):
    tenant: str
    user: str | None = Field(default=None, description="User subject of an override; null: tenant-wide.")


TrafficClass = Literal["interactive", "batch"]


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=100)
    traffic_class: TrafficClass = Field(
        default="interactive", description="batch: the key's requests queue behind interactive ones (fair sharing)."
    )
    expires_at: datetime | None = Field(default=None, description="Absent: the key never expires.")
    expires_in_days: Annotated[StrictInt, Field(ge=1, le=3650)] | None = None


class FrontendKeyCreate(KeyCreate):
    serves_tenants: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        min_length=1,
        max_length=1000,
        description="Tenants whose signed-in people the front end may act for; ['*'] for every tenant.",
    )


class KeyOut(BaseModel):
    id: str
    prefix: str
    name: str
    kind: Literal["personal", "service", "frontend"]
    traffic_class: TrafficClass
    tenant: str
    owner_subject: str
    owner_username: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    serves_tenants: list[str] | None = Field(default=None, description="A front-end key's tenants; null otherwise.")


class KeyCreated(KeyOut):
    key: str = Field(description="The secret key. Shown this once; store it now.")


class Me(BaseModel):
    subject: str
    username: str | None
    client_id: str | None
    tenant: str | None
    roles: list[str]
    auth_method: Literal["oidc", "api_key", "frontend"]
    key_id: str | None
    remaining: dict | None = Field(description="Budget left in the current windows; null without a tenant.")


class UsageRow(BaseModel):
    day: date | None = None
    user: str | None = None
    username: str | None = None
    model: str | None = None
    tenant: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    group_by: Literal["day", "user", "model", "tenant"]
    rows: list[UsageRow]
