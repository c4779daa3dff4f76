"""The quota's calendar windows (day and month in the quota time zone, the UTC minute) and
OpenAI's reset-duration format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Windows:
    """The calendar windows containing `now` in the quota time zone, and when each ends."""

    now: datetime
    day: date
    month: date
    minute: datetime
    day_ends: datetime
    month_ends: datetime
    minute_ends: datetime

    @classmethod
    def at(cls, now: datetime, tz: ZoneInfo) -> Windows:
        if now.tzinfo is None:
            raise ValueError("the ledger clock must return aware datetimes")
        local = now.astimezone(tz)
        day = local.date()
        month = day.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        minute = now.astimezone(UTC).replace(second=0, microsecond=0)
        return cls(
            now=now,
            day=day,
            month=month,
            minute=minute,
            day_ends=_local_midnight(day + timedelta(days=1), tz),
            month_ends=_local_midnight(next_month, tz),
            minute_ends=minute + timedelta(minutes=1),
        )

    def ends(self, window: str) -> datetime:
        return {"day": self.day_ends, "month": self.month_ends, "minute": self.minute_ends}[window]

    def seconds_left(self, window: str) -> float:
        return (self.ends(window) - self.now).total_seconds()


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def reset_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `59s`, `6m0s`, `3h2m1s`."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
