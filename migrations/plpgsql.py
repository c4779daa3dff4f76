"""plpgsql the migrations' quota functions share, written once: how admitting and settling a
request write the tenant's and the user's `quota_counters` rows.

A migration, once released, must do the same to every database it meets: change nothing here
that a released migration renders (tests/test_quota_schema.py pins each migration's functions).
A later change adds a new fragment beside the old one.
"""

from __future__ import annotations

import textwrap

# Writes back the counters record `{row}` (already rolled to the current windows, with the
# request added) over its row.
_STORE = """\
UPDATE quota_counters SET
    day_key = {row}.day_key, day_charged = {row}.day_charged, day_reserved = {row}.day_reserved,
    month_key = {row}.month_key, month_charged = {row}.month_charged,
    month_reserved = {row}.month_reserved, minute_key = {row}.minute_key,
    minute_requests = {row}.minute_requests, in_flight = {row}.in_flight
 WHERE tenant_id = {tenant} AND subject = {subject};"""

# Releases the reservation `r` (a quota_reservations record) and charges `{charged}` tokens, in
# the windows the reservation was made in only (an earlier window is over), freeing its slot.
_SETTLE = """\
UPDATE quota_counters SET
    day_reserved = CASE WHEN day_key = r.day_key THEN day_reserved - r.reserved_tokens ELSE day_reserved END,
    day_charged = CASE WHEN day_key = r.day_key THEN day_charged + {charged} ELSE day_charged END,
    month_reserved = CASE WHEN month_key = r.month_key THEN month_reserved - r.reserved_tokens ELSE month_reserved END,
    month_charged = CASE WHEN month_key = r.month_key THEN month_charged + {charged} ELSE month_charged END,
    in_flight = greatest(in_flight - 1, 0)
 WHERE tenant_id = r.tenant_id AND subject = {subject};"""


def _block(statements: list[str], indent: str) -> str:
    """The statements one after the other, each line indented (no newline at the end)."""
    return textwrap.indent("\n".join(statements), indent)


def store_counters(*, tenant_row: str, user_row: str, tenant: str, subject: str, indent: str = "    ") -> str:
    """Write the admitted request's counters: the tenant's row (subject '') then the user's
    (`subject`), the lock order of every quota function."""
    return _block(
        [
            _STORE.format(row=tenant_row, tenant=tenant, subject="''"),
            _STORE.format(row=user_row, tenant=tenant, subject=subject),
        ],
        indent,
    )


def settle_counters(*, charged: str, indent: str = "    ") -> str:
    """Settle the reservation `r` charging `charged`: the tenant's row, then the user's."""
    return _block(
        [_SETTLE.format(charged=charged, subject="''"), _SETTLE.format(charged=charged, subject="r.subject")],
        indent,
    )
