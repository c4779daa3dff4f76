"""The database a command works on: `AGENCYLLM_DATABASE_URL`, else the embedded Postgres under the
data directory; and the first platform-admin key of a local install."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agencyllm.quotas.db import Database, EmbeddedPostgres
from agencyllm.serving.settings import Settings


def database_url(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The URL to use, and the embedded server started for it (the caller stops it), if any."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), None
    postgres = EmbeddedPostgres(settings.data_dir)
    return postgres.start(), postgres


def bootstrap_admin_key(settings: Settings) -> Path | None:
    """Without Keycloak, make sure a platform-admin key exists in `DATA_DIR/admin.key`."""
    if settings.oidc_issuer or settings.database_url is None:
        return None
    from agencyllm.serving.gateway.identity import ensure_bootstrap_admin_key

    url = settings.database_url.get_secret_value()

    async def run() -> Path | None:
        database = Database(url)
        try:
            return await ensure_bootstrap_admin_key(database, settings.data_dir)
        finally:
            await database.dispose()

    return asyncio.run(run())
