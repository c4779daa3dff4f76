"""Tenants, quotas and the usage ledger in Postgres (SQLAlchemy 2 + asyncpg), in layers:

- `ledger`      admission and settlement: reserve quota, settle usage, calendar windows, leases;
- `compliance`  data governance: content retention and its purge, staff feedback;
- `batches`     uploaded files and batch jobs, their lines leased to workers in Postgres;
- `store`       tenants, quota policies, API keys and usage reports (the admin API's store);
- `audit`       the tamper-evident audit log every writer above appends to;
- `db`, `models`  the database (engine, pool, schema gate) and the tables;
- `embedded`    the bundled PostgreSQL server for local runs (below `db`, which re-exports it).

May import `agencyllm.auth` and `agencyllm.migrations` (the schema); never `agencyllm.serving`.
"""
