"""The Alembic schema migrations of the quota ledger's database (`quotas.models` holds the tables)."""
