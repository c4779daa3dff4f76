"""What the gateway asks the ledger (`ReservationRequest`), what an admission grants
(`Reservation`), and the refusal (`AdmissionRefused`)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class ReservationRequest:
    request_id: str
    tenant: str
    subject: str
    username: str | None
    key_id: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    max_tokens: int | None
    context_length: int
    # For the audit record: the OIDC client (azp) and the caller's network address.
    client_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Reservation:
    id: int
    request_id: str
    tenant_id: UUID
    subject: str
    max_tokens: int  # effective: after the per-request cap and the context length
    reserved_tokens: int  # prompt_tokens + max_tokens
    headers: dict[str, str]
    tenant: str = ""
    model: str = ""
    client_id: str | None = None
    source: str | None = None


class AdmissionRefused(Exception):
    """A request the quotas do not let in. `reason` says why: `tenant_not_found`,
    `tenant_suspended`, `model_not_allowed`, `max_tokens_over_limit`, `context_length_exceeded`,
    or the limit reached (`tokens_per_day`, `tokens_per_month`, `requests_per_minute`,
    `max_concurrent_requests`). `retry_after`: seconds until the window reopens, when known;
    `headers`: the limit's `x-ratelimit-*` facts. serving/gateway/errors.py turns it into an answer."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})
