"""Files and batches in Postgres: uploaded files (`files`) and batch jobs whose lines are leased
to workers (`jobs`), so a batch survives the loss of any worker or of the whole platform.

May import: `agencyllm.quotas.audit`, `db`, `models`.
"""
