"""The quota ledger's metrics through `ray.util.metrics`, which Ray exports to Prometheus (as
`ray_agencyllm_*`). The Ray ingress passes `ray_quota_metrics()` in when it builds the gateway;
names, help texts and buckets are the ledger's own (`agencyllm.quotas.ledger.metrics`)."""

from __future__ import annotations

import threading

from ray.util.metrics import Counter, Histogram

from agencyllm.quotas.ledger.metrics import (
    E2E_SECONDS,
    LATENCY_BUCKETS,
    REQUESTS_ADMITTED,
    REQUESTS_REFUSED,
    RESERVATION_BUCKETS,
    RESERVATION_SECONDS,
    TOKENS_CHARGED,
    TTFT_SECONDS,
    QuotaMetrics,
    never_raises,
)


class RayQuotaMetrics:
    """`QuotaMetrics` as Ray metrics; one per process (Ray refuses a second metric of a name)."""

    def __init__(self) -> None:
        self._charged = Counter(TOKENS_CHARGED, "Tokens charged to quotas", ("tenant", "model"))
        self._admitted = Counter(REQUESTS_ADMITTED, "Requests admitted by the quota ledger", ("tenant", "model"))
        self._refused = Counter(REQUESTS_REFUSED, "Requests refused by the quota ledger", ("tenant", "model", "reason"))
        self._latency = Histogram(RESERVATION_SECONDS, "Time to admit (reserve) a request", RESERVATION_BUCKETS)
        self._ttft = Histogram(
            TTFT_SECONDS, "Time from admission to the first token", LATENCY_BUCKETS, ("tenant", "model")
        )
        self._e2e = Histogram(
            E2E_SECONDS, "Time from admission to the end of the response", LATENCY_BUCKETS, ("tenant", "model")
        )

    @never_raises
    def tokens_charged(self, tenant: str, model: str, tokens: int) -> None:
        if tokens > 0:  # Ray's Counter.inc refuses 0 (a request refused by its engine charges 0)
            self._charged.inc(tokens, {"tenant": tenant, "model": model})

    @never_raises
    def admitted(self, tenant: str, model: str) -> None:
        self._admitted.inc(1, {"tenant": tenant, "model": model})

    @never_raises
    def refused(self, tenant: str, model: str, reason: str) -> None:
        self._refused.inc(1, {"tenant": tenant, "model": model, "reason": reason})

    @never_raises
    def reservation_seconds(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def request_finished(self, tenant: str, model: str, ttft_ms: float | None, latency_ms: float) -> None:
        tags = {"tenant": tenant, "model": model}
        if ttft_ms is not None:
            self._ttft.observe(ttft_ms / 1000, tags)
        self._e2e.observe(latency_ms / 1000, tags)


_metrics: QuotaMetrics | None = None
_lock = threading.Lock()


def ray_quota_metrics() -> QuotaMetrics:
    """This process' Ray quota metrics (created on first use, inside a Ray worker)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = RayQuotaMetrics()
    return _metrics
