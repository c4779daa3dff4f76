"""Usage of the last 30 days, shaped for the charts: tokens per day split by model or by user.

Built from the admin store's `usage_report` (the same totals `/admin/v1/usage` returns): one query
for the split's leaders, one per leader by day, and one for the day totals ("other" is the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas import store
from agencyllm.serving.console.charts import Series, series_colours, stacked_bars

DAYS = 30
SERIES = 5
TOP_USERS = 10
OTHER = "Other"


def window(time_zone: str, *, today: date | None = None) -> tuple[date, date]:
    """The last DAYS calendar days in the quota time zone, today included."""
    last = today or datetime.now(ZoneInfo(time_zone)).date()
    return last - timedelta(days=DAYS - 1), last


@dataclass
class UsageChart:
    days: list[date]
    series: list[Series]
    svg: Markup
    totals: dict[date, int]
    top_users: list[dict[str, Any]]
    requests: int
    tokens: int

    @property
    def empty(self) -> bool:
        return self.tokens == 0


def _by_day(rows: list[dict[str, Any]]) -> dict[date, int]:
    return {date.fromisoformat(str(row["day"])): row["total_tokens"] for row in rows}


async def usage_chart(
    session: AsyncSession,
    time_zone: str,
    *,
    tenant: str | None,
    split: str = "model",
    user: str | None = None,
    subject_label: str = "",
    today: date | None = None,
) -> UsageChart:
    first, last = window(time_zone, today=today)
    since, until = store.day_bounds(first, last, time_zone)
    scope = {"tenant_name": tenant, "user": user, "since": since, "until": until, "time_zone": time_zone}
    days = [first + timedelta(days=i) for i in range(DAYS)]
    totals = _by_day(await store.usage_report(session, group_by="day", **scope))
    leaders = await store.usage_report(session, group_by=split, **scope)
    leaders.sort(key=lambda row: row["total_tokens"], reverse=True)
    series: list[tuple[str, dict[date, int]]] = []
    for row in leaders[:SERIES]:
        if row["total_tokens"] <= 0:
            continue
        key = row[split]
        filters = {**scope, "model": key} if split == "model" else {**scope, "user": key}
        label = key if split == "model" else (row.get("username") or key)
        series.append((label, _by_day(await store.usage_report(session, group_by="day", **filters))))
    rest = {day: totals.get(day, 0) - sum(values.get(day, 0) for _, values in series) for day in days}
    if any(value > 0 for value in rest.values()):
        series.append((OTHER, rest))
    colours = series_colours([label for label, _ in series], OTHER)
    drawn = [Series(label, values, colour) for (label, values), colour in zip(series, colours, strict=True)]
    split_words = "model" if split == "model" else "user"
    scope_words = subject_label or (f"tenant {tenant}" if tenant else "all tenants")
    tokens = sum(totals.values())
    svg = stacked_bars(
        days,
        drawn,
        title=f"Tokens per day by {split_words}, {scope_words}, {first:%b %d} to {last:%b %d}",
        description=f"{tokens:,} tokens in {DAYS} days. The table below the chart lists every value.",
        chart_id=f"chart-{split}",
    )
    users: list[dict[str, Any]] = []
    if user is None:
        users = await store.usage_report(session, group_by="user", **scope)
        users.sort(key=lambda row: row["total_tokens"], reverse=True)
        users = users[:TOP_USERS]
    requests = sum(row["requests"] for row in leaders)
    return UsageChart(days, drawn, svg, totals, users, requests, tokens)
