"""Quota metrics behind one small interface, `QuotaMetrics`: its names and buckets, and the
default backend, prometheus_client's registry. The ledger takes another backend where it runs:
inside Ray the serving side passes Ray's metrics (`serving/rayserve/metrics.py`), which Ray exports
to Prometheus. Names are Prometheus names either way."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol

TOKENS_CHARGED = "agencyllm_tokens_charged_total"
REQUESTS_ADMITTED = "agencyllm_requests_admitted_total"
REQUESTS_REFUSED = "agencyllm_requests_refused_total"
RESERVATION_SECONDS = "agencyllm_reservation_seconds"
RESERVATION_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
TTFT_SECONDS = "agencyllm_time_to_first_token_seconds"
E2E_SECONDS = "agencyllm_request_duration_seconds"
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]

log = logging.getLogger(__name__)
P = ParamSpec("P")


def never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """A metric is never worth a request: its failure is logged (once per metric) and dropped."""
    failed = False

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        nonlocal failed
        try:
            method(*args, **kwargs)
        except Exception as exc:
            if not failed:
                failed = True
                log.warning("metric %s not recorded: %s", method.__name__, type(exc).__name__)

    return wrapper


class QuotaMetrics(Protocol):
    def tokens_charged(self, tenant: str, model: str, tokens: int) -> None: ...
    def admitted(self, tenant: str, model: str) -> None: ...
    def refused(self, tenant: str, model: str, reason: str) -> None: ...
    def reservation_seconds(self, seconds: float) -> None: ...
    def request_finished(self, tenant: str, model: str, ttft_ms: float | None, latency_ms: float) -> None: ...


class _PrometheusMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        # prometheus_client appends `_total` to counters itself.
        self._charged = Counter(TOKENS_CHARGED.removesuffix("_total"), "Tokens charged to quotas", ["tenant", "model"])
        self._admitted = Counter(
            REQUESTS_ADMITTED.removesuffix("_total"), "Requests admitted by the quota ledger", ["tenant", "model"]
        )
        self._refused = Counter(
            REQUESTS_REFUSED.removesuffix("_total"),
            "Requests refused by the quota ledger",
            ["tenant", "model", "reason"],
        )
        self._latency = Histogram(RESERVATION_SECONDS, "Time to admit (reserve) a request", buckets=RESERVATION_BUCKETS)
        self._ttft = Histogram(
            TTFT_SECONDS, "Time from admission to the first token", ["tenant", "model"], buckets=LATENCY_BUCKETS
        )
        self._e2e = Histogram(
            E2E_SECONDS, "Time from admission to the end of the response", ["tenant", "model"], buckets=LATENCY_BUCKETS
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # .labels() costs a lock and a validation per call; this is on every request's path.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    @never_raises
    def tokens_charged(self, tenant: str, model: str, tokens: int) -> None:
        if tokens > 0:
            self._child(self._charged, tenant, model).inc(tokens)

    @never_raises
    def admitted(self, tenant: str, model: str) -> None:
        self._child(self._admitted, tenant, model).inc()

    @never_raises
    def refused(self, tenant: str, model: str, reason: str) -> None:
        self._child(self._refused, tenant, model, reason).inc()

    @never_raises
    def reservation_seconds(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def request_finished(self, tenant: str, model: str, ttft_ms: float | None, latency_ms: float) -> None:
        if ttft_ms is not None:
            self._child(self._ttft, tenant, model).observe(ttft_ms / 1000)
        self._child(self._e2e, tenant, model).observe(latency_ms / 1000)


_metrics: QuotaMetrics | None = None
_lock = threading.Lock()


def quota_metrics() -> QuotaMetrics:
    """The process-wide Prometheus metrics, the ledger's default (created on first use: the
    registry forbids duplicate names)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _PrometheusMetrics()
    return _metrics
