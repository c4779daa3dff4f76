"""Usage reports: requests and tokens per day, user, model or tenant."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import String, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas.models import (
    Tenant,
    UsageRecord,
)
from agencyllm.quotas.store.changes import jsonable
from agencyllm.quotas.store.errors import Invalid
from agencyllm.quotas.store.tenants import get_tenant

GROUP_BY = ("day", "user", "model", "tenant")

# --- usage --------------------------------------------------------------------------------------


async def usage_report(
    session: AsyncSession,
    *,
    tenant_name: str | None = None,
    user: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "day",
    time_zone: str = "UTC",
) -> list[dict[str, Any]]:
    """Rows of {<group_by>, requests, prompt_tokens, completion_tokens, total_tokens}.

    `since` is inclusive and `until` exclusive (on the request's start time); days are calendar
    days in `time_zone`. `user` matches the subject or the username.
    """
    if group_by not in GROUP_BY:
        raise Invalid(f"'group_by' must be one of {', '.join(GROUP_BY)}.", param="group_by")
    if since is not None and until is not None and since >= until:
        raise Invalid("'from' must be before 'to'.", param="from")
    record = UsageRecord
    group_columns: list[Any]
    if group_by == "day":
        # Rendered inline: GROUP BY must repeat the select's expression, bind parameters and all.
        zone = bindparam("zone", time_zone, type_=String, literal_execute=True)
        day = func.date(func.timezone(zone, record.started_at))
        group_columns = [day.label("day")]
    elif group_by == "user":
        group_columns = [record.subject.label("user")]
    elif group_by == "model":
        group_columns = [record.model.label("model")]
    else:
        group_columns = [Tenant.name.label("tenant")]
    totals = [
        func.count().label("requests"),
        func.coalesce(func.sum(record.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(record.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(record.total_tokens), 0).label("total_tokens"),
    ]
    extra = [func.max(record.username).label("username")] if group_by == "user" else []
    query = select(*group_columns, *extra, *totals).select_from(record)
    if group_by == "tenant":
        query = query.join(Tenant, Tenant.id == record.tenant_id)
    if tenant_name is not None:
        tenant = await get_tenant(session, tenant_name)
        query = query.where(record.tenant_id == tenant.id)
    if user is not None:
        query = query.where((record.subject == user) | (record.username == user))
    if model is not None:
        query = query.where(record.model == model)
    if since is not None:
        query = query.where(record.started_at >= since)
    if until is not None:
        query = query.where(record.started_at < until)
    query = query.group_by(*group_columns).order_by(*group_columns)
    rows = []
    for row in (await session.execute(query)).mappings():
        item = {k: jsonable(v) for k, v in row.items()}
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            item[field] = int(item[field])
        rows.append(item)
    return rows


def day_bounds(first: date | None, last: date | None, time_zone: str) -> tuple[datetime | None, datetime | None]:
    """[first 00:00, day after last 00:00) in `time_zone`, as aware datetimes."""
    zone = ZoneInfo(time_zone)
    since = datetime.combine(first, datetime.min.time(), zone) if first else None
    until = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone) if last else None
    return since, until
