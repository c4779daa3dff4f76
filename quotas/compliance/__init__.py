"""Data governance records: the per-tenant content-retention opt-in and its purge (`governance`,
`retention`) and the staff feedback channel (`feedback`).

May import: `agencyllm.quotas.store`, `audit`, `db`, `models`.
"""
