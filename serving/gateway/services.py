"""`Services`: what the admin routes and the request pipeline share (database, ledger,
authenticator, governance), built from the settings once per replica and closed with it."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from agencyllm.quotas.db import Database, assert_schema_current
from agencyllm.quotas.ledger import Ledger
from agencyllm.quotas.ledger.metrics import QuotaMetrics
from agencyllm.serving.gateway.governance import Governance, retention_job
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.settings import Settings


@dataclass
class Services:
    """What the admin routes and the pipeline share, built from the settings once."""

    settings: Settings
    database: Database
    ledger: Ledger
    authenticator: Authenticator
    governance: Governance

    @classmethod
    async def start(cls, settings: Settings, *, metrics: QuotaMetrics | None = None) -> Services:
        """Open the database and build the services on it; `metrics` is where the ledger counts
        (by default this process' Prometheus registry; the Ray side passes Ray's metrics)."""
        if settings.database_url is None:
            raise ValueError("the gateway needs settings.database_url")
        database = Database(settings.database_url.get_secret_value())
        try:
            await assert_schema_current(database)
            ledger = Ledger(
                database,
                timezone=settings.quota_timezone,
                lease_seconds=settings.reservation_lease_seconds,
                metrics=metrics,
                retention=retention_job(settings, database),
            )
            governance = await Governance.load(database)
            authenticator = Authenticator.from_settings(settings, database)
        except BaseException:
            await database.dispose()
            raise
        return cls(settings, database, ledger, authenticator, governance)

    def install(self, app: FastAPI) -> None:
        """Put the services where the admin routes' dependencies (`serving/gateway/deps.py`) find them."""
        app.state.settings = self.settings
        app.state.database = self.database
        app.state.ledger = self.ledger
        app.state.authenticator = self.authenticator

    async def aclose(self) -> None:
        await self.governance.drain()
        await self.ledger.audit.aclose()
        await self.authenticator.aclose()
        await self.database.dispose()
