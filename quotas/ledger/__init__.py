"""The usage ledger: admission (reserve) and settlement against the quota counters in Postgres.

Modules: `requests` (what is asked, granted or refused), `windows` (calendar windows), `refusals`
(refusal messages and rate-limit headers), `remaining` (the budget-left report), `accounting`
(the `Ledger`), `batching` (natural batching of its calls), `metrics` (its counters).
Semantics and guarantees: docs/quotas.md.

May import every layer below it in `agencyllm.quotas` (compliance, store, audit, db, models);
never `agencyllm.serving`.
"""

from agencyllm.quotas.ledger.accounting import MAX_BATCHES_IN_FLIGHT, REAP_BATCH, Ledger
from agencyllm.quotas.ledger.requests import AdmissionRefused, Reservation, ReservationRequest
from agencyllm.quotas.ledger.windows import Windows

__all__ = [
    "MAX_BATCHES_IN_FLIGHT",
    "REAP_BATCH",
    "AdmissionRefused",
    "Ledger",
    "Reservation",
    "ReservationRequest",
    "Windows",
]
