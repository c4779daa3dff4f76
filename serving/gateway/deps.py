"""Typed request dependencies, in one place: route modules declare what they need, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import State

from agencyllm.auth.principal import Principal
from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import Ledger
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.settings import Settings


def _state(request: Request) -> State:
    state: State = request.app.state
    return state


def get_settings(request: Request) -> Settings:
    settings: Settings = _state(request).settings
    return settings


def get_database(request: Request) -> Database:
    database: Database = _state(request).database
    return database


def get_ledger(request: Request) -> Ledger:
    ledger: Ledger = _state(request).ledger
    return ledger


async def get_db_session(database: Annotated[Database, Depends(get_database)]) -> AsyncIterator[AsyncSession]:
    async with database.sessions() as session:
        yield session


async def get_current_principal(request: Request) -> Principal:
    authenticator: Authenticator = _state(request).authenticator
    return await authenticator.authenticate(request.headers.get("authorization"))


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbSession = Annotated[AsyncSession, Depends(get_db_session)]
LedgerDep = Annotated[Ledger, Depends(get_ledger)]
CurrentPrincipal = Annotated[Principal, Depends(get_current_principal)]
