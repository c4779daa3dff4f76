"""What an admission says back: the refusal (`AdmissionRefused`) of a limit reached, and the
`x-ratelimit-*` headers of a request let in."""

from __future__ import annotations

from typing import Any

from agencyllm.quotas.ledger.requests import AdmissionRefused, ReservationRequest
from agencyllm.quotas.ledger.windows import Windows, reset_duration

_DIMENSION_WINDOW = {
    "tokens_per_day": "day",
    "tokens_per_month": "month",
    "requests_per_minute": "minute",
    "max_concurrent_requests": None,
}
_DIMENSION_TEXT = {
    "tokens_per_day": "daily token budget",
    "tokens_per_month": "monthly token budget",
    "requests_per_minute": "requests-per-minute limit",
    "max_concurrent_requests": "concurrent-request limit",
}


def refusal(req: ReservationRequest, row: Any, windows: Windows) -> AdmissionRefused:
    outcome, limit = row["outcome"], row["limit_value"]
    if outcome == "unknown_tenant":
        return AdmissionRefused("tenant_not_found", f"Unknown tenant '{req.tenant}'.")
    if outcome == "suspended":
        return AdmissionRefused("tenant_suspended", f"Tenant '{req.tenant}' is suspended.")
    if outcome == "model_not_allowed":
        return AdmissionRefused(
            "model_not_allowed", f"Model '{req.model}' is not allowed for your account.", param="model"
        )
    if outcome == "max_tokens_over_cap":
        return AdmissionRefused(
            "max_tokens_over_limit", f"max_tokens must be at most {limit} for your account.", param="max_tokens"
        )
    if outcome == "context_length_exceeded":
        return AdmissionRefused(
            "context_length_exceeded",
            f"The prompt ({req.prompt_tokens} tokens) leaves no room in the model's context of {limit} tokens.",
            param="messages",
        )
    whose = f"tenant '{req.tenant}'" if row["scope"] == "tenant" else "your user"
    what = f"The {_DIMENSION_TEXT[outcome]} of {whose} ({limit})"
    window = _DIMENSION_WINDOW[outcome]
    retry_after = windows.seconds_left(window) if window else None
    headers: dict[str, str] = {}
    if outcome.startswith("tokens_"):
        need = row["reserved"]
        message = (
            f"{what} has too little left for this request, which reserves {need} tokens "
            "(prompt + max_tokens). Lower max_tokens or retry when the window resets."
        )
        headers["x-ratelimit-limit-tokens"] = str(limit)
        headers["x-ratelimit-reset-tokens"] = reset_duration(retry_after or 0)
    else:
        message = f"{what} is reached. Retry later."
        if window:
            headers["x-ratelimit-limit-requests"] = str(limit)
            headers["x-ratelimit-remaining-requests"] = "0"
            headers["x-ratelimit-reset-requests"] = reset_duration(retry_after or 0)
    return AdmissionRefused(outcome, message, retry_after=retry_after, headers=headers)


def admission_headers(row: Any, windows: Windows) -> dict[str, str]:
    headers: dict[str, str] = {}
    if row["tok_limit"] is not None:
        headers["x-ratelimit-limit-tokens"] = str(row["tok_limit"])
        headers["x-ratelimit-remaining-tokens"] = str(max(0, row["tok_remaining"]))
        headers["x-ratelimit-reset-tokens"] = reset_duration(windows.seconds_left(row["tok_window"]))
    if row["req_limit"] is not None:
        headers["x-ratelimit-limit-requests"] = str(row["req_limit"])
        headers["x-ratelimit-remaining-requests"] = str(max(0, row["req_remaining"]))
        headers["x-ratelimit-reset-requests"] = reset_duration(windows.seconds_left("minute"))
    return headers
