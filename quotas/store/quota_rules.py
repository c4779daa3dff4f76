"""The quota rules, defined once: the `Quota` model is the admin API's request body (and its
OpenAPI schema), the console's form checks and the store's validation (`validate_quota`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints, ValidationError

from agencyllm.quotas.models import MAX_SHARE
from agencyllm.quotas.store.errors import Invalid

QUOTA_LIMIT_FIELDS = (
    "tokens_per_day",
    "tokens_per_month",
    "requests_per_minute",
    "max_concurrent_requests",
    "max_tokens_per_request",
)
QUOTA_FIELDS = (*QUOTA_LIMIT_FIELDS, "max_tokens_mode", "allowed_models", "share")
# Column limits (BIGINT for token budgets, INTEGER for the rest): larger is a typo, not a budget.
_INT32, _INT64 = 2**31 - 1, 2**63 - 1
QUOTA_MAXIMUMS = {
    "tokens_per_day": _INT64,
    "tokens_per_month": _INT64,
    "requests_per_minute": _INT32,
    "max_concurrent_requests": _INT32,
    "max_tokens_per_request": _INT32,
}

Budget = Annotated[StrictInt, Field(ge=0, le=_INT64)]
SmallLimit = Annotated[StrictInt, Field(ge=0, le=_INT32)]
ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


def _a_number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Share = Annotated[float, BeforeValidator(_a_number), Field(gt=0, le=MAX_SHARE)]


class Quota(BaseModel):
    """A full policy: a field left out or null means no limit on that dimension."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_day: Budget | None = None
    tokens_per_month: Budget | None = None
    requests_per_minute: SmallLimit | None = None
    max_concurrent_requests: SmallLimit | None = None
    max_tokens_per_request: SmallLimit | None = None
    max_tokens_mode: Literal["cap", "reject"] = Field(
        default="cap", description="Over max_tokens_per_request: lower the request's max_tokens, or refuse it."
    )
    allowed_models: list[ModelName] | None = Field(default=None, description="null: every model.")
    share: Share | None = Field(
        default=None,
        description="Weight of the tenant's claim on engine slots when tenants compete (tenant-wide only); null: 1.",
    )


# The store's wording for a field that breaks its rule, in the order the store checks them.
_PROBLEMS = {
    **{
        field: f"'{field}' must be an integer from 0 to {QUOTA_MAXIMUMS[field]}, or null."
        for field in QUOTA_LIMIT_FIELDS
    },
    "share": f"'share' must be a number above 0 and at most {MAX_SHARE}, or null (1).",
    "max_tokens_mode": "'max_tokens_mode' must be 'cap' or 'reject'.",
    "allowed_models": "'allowed_models' must be a list of model names, or null for all models.",
}
_CHECK_ORDER = list(_PROBLEMS)


def validate_quota(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A complete policy from `fields`: omitted limits mean unlimited, mode defaults to 'cap'."""
    unknown = set(fields) - set(QUOTA_FIELDS)
    if unknown:
        field = sorted(unknown)[0]
        raise Invalid(f"Unknown quota field '{field}'; known fields: {', '.join(QUOTA_FIELDS)}.", param=field)
    try:
        quota = Quota.model_validate({**fields, "max_tokens_mode": fields.get("max_tokens_mode") or "cap"})
    except ValidationError as exc:
        broken = {str(error["loc"][0]) for error in exc.errors()}
        field = min(broken, key=_CHECK_ORDER.index)
        raise Invalid(_PROBLEMS[field], param=field) from None
    policy = quota.model_dump()
    if quota.allowed_models is not None:
        policy["allowed_models"] = list(dict.fromkeys(quota.allowed_models))
    return policy
