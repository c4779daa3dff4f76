"""How the store changes data: who acts (`Actor`), one transaction per change (`transaction`) and
the audit record each change leaves (`record_change`). Writers in `quotas.compliance` and the
platform's own bootstrap use the same two helpers, so every change is committed and audited alike."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas.audit import request_source
from agencyllm.quotas.models import AuditEvent
from agencyllm.quotas.store.errors import Conflict


class Actor(Protocol):
    """Whoever makes a change (a `Principal` fits); recorded in the audit trail."""

    @property
    def subject(self) -> str: ...

    @property
    def username(self) -> str | None: ...


@dataclass(frozen=True)
class SystemActor:
    subject: str = "system"
    username: str | None = "system"


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- transactions and audit -------------------------------------------------------------------


@asynccontextmanager
async def transaction(session: AsyncSession) -> AsyncIterator[None]:
    try:
        yield
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(_integrity_message(exc)) from None
    except BaseException:
        await session.rollback()
        raise


def _integrity_message(exc: IntegrityError) -> str:
    # A race past our explicit checks (two admins at once): say which rule, not the SQL.
    text = str(exc.orig)
    if "keycloak_group" in text:
        return "Another tenant already uses that Keycloak group."
    if "name" in text and "tenants" in text:
        return "A tenant with that name already exists."
    if "foreign key" in text.lower():
        return "The change conflicts with records that refer to it."
    return "The change conflicts with existing data."


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def record_change(
    session: AsyncSession,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> None:
    snapshot = after if after is not None else before or {}
    tenant = {"tenant": target_id, "quota": target_id.split("/", 1)[0]}.get(target_type, snapshot.get("tenant"))
    session.add(
        AuditEvent(
            at=utcnow(),
            actor_subject=actor.subject,
            actor_username=actor.username,
            # AU-3 "who" and "where from" (a Principal carries them; SystemActor does not).
            actor_client_id=getattr(actor, "client_id", None),
            actor_key_id=getattr(actor, "key_id", None),
            source=request_source.get(),
            tenant=tenant,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before={k: jsonable(v) for k, v in before.items()} if before is not None else None,
            after={k: jsonable(v) for k, v in after.items()} if after is not None else None,
        )
    )
