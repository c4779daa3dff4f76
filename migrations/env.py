"""Alembic environment: async engine (asyncpg), target metadata from agencyllm.quotas.models.
A caller may hand in an open sync connection as `config.attributes["connection"]` (tests)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from agencyllm.quotas.models import Base

config = context.config
target_metadata = Base.metadata


# Replicas starting together may all run `upgrade`: the first migrates, the others wait here
# and then find the schema at head (one transaction: Postgres has transactional DDL).
UPGRADE_LOCK_KEY = 0x61676C6D  # "aglm"


def run_with(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK_KEY})")
        context.run_migrations()


async def run_async() -> None:
    engine = create_async_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_with)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    run_with(connection)
else:
    asyncio.run(run_async())
