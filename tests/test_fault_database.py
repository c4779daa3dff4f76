"""A database that cannot be reached: recognised through every wrapper, answered 503 with
Retry-After on the admin and OpenAI paths (never 500), and logged once per outage."""

from __future__ import annotations

import logging
import time

import asyncpg
import httpx
import pytest
import sqlalchemy.exc
from fastapi import FastAPI

from agencyllm.quotas.db import Availability, Database, database_unavailable
from agencyllm.quotas.ledger import Ledger
from agencyllm.serving.admin import router
from agencyllm.serving.gateway.errors import as_openai_error, install_error_handlers
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.settings import Settings


def wrapped(inner: BaseException) -> BaseException:
    """How SQLAlchemy hands over a refused connection: its error, caused by the driver's."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, exc) from exc
    except sqlalchemy.exc.OperationalError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (FileNotFoundError(2, "no socket"), True),
        (TimeoutError(), True),
        (wrapped(ConnectionResetError(104, "reset")), True),
        # asyncpg's pool resetting a connection that broke under a query (seen on a killed Postgres)
        (asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"), True),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate")), False),
        (ValueError("bad input"), False),
        (KeyError("x"), False),
    ],
)
def test_unreachable_database_is_recognised(exc, expected):
    assert database_unavailable(exc) is expected


def test_unreachable_database_is_a_503_with_retry_after():
    error = as_openai_error(wrapped(ConnectionRefusedError(111, "refused")))
    assert error.status == 503 and error.type == "service_unavailable"
    assert int(error.headers["Retry-After"]) >= 1
    assert as_openai_error(ValueError("ours")) is None  # a fault of our own stays a 500


def test_an_outage_is_logged_once_and_its_end_once(caplog):
    availability = Availability()
    with caplog.at_level(logging.INFO, logger="agencyllm.quotas.db"):
        for _ in range(50):
            availability.failed(ConnectionRefusedError())
        availability.ok()
        availability.ok()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


async def test_admin_routes_answer_503_quickly_when_the_database_is_gone(tmp_path):
    from conftest import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/agencyllm"  # nothing listens there
    settings = Settings(data_dir=tmp_path)
    database = Database(url)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = settings
    app.state.database = database
    app.state.ledger = Ledger(database)
    app.state.authenticator = Authenticator(settings, database, None)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            key = "sk-agency-abcdefghijkl_" + "x" * 43
            for path in ("/admin/v1/tenants", "/admin/v1/me", "/admin/v1/usage"):
                started = time.monotonic()
                response = await client.get(path, headers={"authorization": f"Bearer {key}"})
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"]["type"] == "service_unavailable"
                assert int(response.headers["retry-after"]) >= 1
                assert time.monotonic() - started < 10
    finally:
        await database.dispose()
