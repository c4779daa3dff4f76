"""Initial schema: tenants, quota policies, API keys, usage ledger, audit events, and the ledger's
counters and reservations with the plpgsql functions that admit and settle in one round trip.
Long because a released migration stays whole: its tables and function bodies are frozen here.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from agencyllm.migrations.plpgsql import settle_counters, store_counters

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UUID_DEFAULT = sa.text("gen_random_uuid()")


def _now() -> sa.TextClause:
    return sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), server_default=UUID_DEFAULT, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("keycloak_group", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), server_default="active", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.CheckConstraint("name ~ '^[a-z0-9][a-z0-9-]{1,62}$'", name="ck_tenants_name_format"),
        sa.CheckConstraint("status IN ('active', 'suspended')", name="ck_tenants_status"),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
        sa.UniqueConstraint("keycloak_group", name="uq_tenants_keycloak_group"),
    )
    op.create_table(
        "quota_policies",
        sa.Column("id", sa.Uuid(), server_default=UUID_DEFAULT, nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("tokens_per_month", sa.BigInteger(), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_concurrent_requests", sa.Integer(), nullable=True),
        sa.Column("max_tokens_per_request", sa.Integer(), nullable=True),
        sa.Column("max_tokens_mode", sa.String(8), server_default="cap", nullable=False),
        sa.Column("allowed_models", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.CheckConstraint("tokens_per_day >= 0", name="ck_quota_policies_tokens_per_day"),
        sa.CheckConstraint("tokens_per_month >= 0", name="ck_quota_policies_tokens_per_month"),
        sa.CheckConstraint("requests_per_minute >= 0", name="ck_quota_policies_requests_per_minute"),
        sa.CheckConstraint("max_concurrent_requests >= 0", name="ck_quota_policies_max_concurrent_requests"),
        sa.CheckConstraint("max_tokens_per_request >= 0", name="ck_quota_policies_max_tokens_per_request"),
        sa.CheckConstraint("max_tokens_mode IN ('cap', 'reject')", name="ck_quota_policies_max_tokens_mode"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_quota_policies_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_quota_policies"),
        sa.UniqueConstraint(
            "tenant_id",
            "subject",
            name="uq_quota_policies_tenant_id_subject",
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), server_default=UUID_DEFAULT, nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(255), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("owner_subject", sa.Text(), nullable=False),
        sa.Column("owner_username", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('personal', 'service')", name="ck_api_keys_kind"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_api_keys_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_index("ix_api_keys_owner_subject", "api_keys", ["owner_subject"])
    op.create_table(
        "usage_ledger",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=True),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("endpoint IN ('chat', 'completions', 'embeddings')", name="ck_usage_ledger_endpoint"),
        sa.CheckConstraint(
            "status IN ('ok', 'client_error', 'engine_error', 'cancelled', 'expired')",
            name="ck_usage_ledger_status",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_usage_ledger"),
        sa.UniqueConstraint("request_id", name="uq_usage_ledger_request_id"),
    )
    op.create_index("ix_usage_ledger_tenant_id_started_at", "usage_ledger", ["tenant_id", "started_at"])
    op.create_index("ix_usage_ledger_subject", "usage_ledger", ["subject"])
    op.create_index("ix_usage_ledger_model", "usage_ledger", ["model"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=_now(), nullable=False),
        sa.Column("actor_subject", sa.Text(), nullable=False),
        sa.Column("actor_username", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target_type", sa.Text(), nullable=False),
        sa.Column("target_id", sa.Text(), nullable=True),
        sa.Column("before", postgresql.JSONB(), nullable=True),
        sa.Column("after", postgresql.JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_target_type_target_id", "audit_events", ["target_type", "target_id"])
    op.create_table(
        "quota_counters",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("day_key", sa.Date(), nullable=False),
        sa.Column("day_charged", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("day_reserved", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("month_key", sa.Date(), nullable=False),
        sa.Column("month_charged", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("month_reserved", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("minute_key", sa.DateTime(timezone=True), nullable=False),
        sa.Column("minute_requests", sa.Integer(), server_default="0", nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_quota_counters_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "subject", name="pk_quota_counters"),
        postgresql_with={"fillfactor": 50},
    )
    op.create_table(
        "quota_reservations",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=True),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("day_key", sa.Date(), nullable=False),
        sa.Column("month_key", sa.Date(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_quota_reservations_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_quota_reservations"),
        sa.UniqueConstraint("request_id", name="uq_quota_reservations_request_id"),
    )
    op.create_index("ix_quota_reservations_lease_expires_at", "quota_reservations", ["lease_expires_at"])
    for statement in FUNCTIONS:
        op.execute(statement)


def downgrade() -> None:
    for name in FUNCTION_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {name}")
    for table in (
        "quota_reservations",
        "quota_counters",
        "audit_events",
        "usage_ledger",
        "api_keys",
        "quota_policies",
        "tenants",
    ):
        op.drop_table(table)


FUNCTION_SIGNATURES = (
    "quota_reap(timestamptz, integer)",
    "quota_settle(bigint, integer, integer, text, double precision, double precision, timestamptz)",
    "quota_reserve(text, text, text, text, uuid, text, text, integer, integer, integer, "
    "timestamptz, date, date, timestamptz, timestamptz)",
    "quota_refusal(quota_counters, quota_policies, bigint)",
    "quota_lock_counter(uuid, text, date, date, timestamptz)",
)

# Frozen copies: a later revision that changes a function replaces it in its own file.
FUNCTIONS = (
    # Locks (creating if needed) one scope's counters. Lock order everywhere: the tenant row
    # (subject '') before user rows, so reserve/settle/reap cannot deadlock.
    r"""
CREATE FUNCTION quota_lock_counter(p_tenant uuid, p_subject text, p_day date, p_month date,
                                   p_minute timestamptz)
RETURNS quota_counters LANGUAGE plpgsql AS $$
DECLARE
    c quota_counters;
BEGIN
    SELECT * INTO c FROM quota_counters
     WHERE tenant_id = p_tenant AND subject = p_subject FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO quota_counters (tenant_id, subject, day_key, month_key, minute_key)
        VALUES (p_tenant, p_subject, p_day, p_month, p_minute) ON CONFLICT DO NOTHING;
        SELECT * INTO c FROM quota_counters
         WHERE tenant_id = p_tenant AND subject = p_subject FOR UPDATE;
    END IF;
    RETURN c;
END $$
""",
    # The first limit of `p` that admitting `p_need` more tokens and one more request would
    # break, or NULL. Counters are already rolled to the current windows.
    r"""
CREATE FUNCTION quota_refusal(c quota_counters, p quota_policies, p_need bigint)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF c.day_charged + c.day_reserved + p_need > p.tokens_per_day THEN
        RETURN 'tokens_per_day';
    ELSIF c.month_charged + c.month_reserved + p_need > p.tokens_per_month THEN
        RETURN 'tokens_per_month';
    ELSIF c.minute_requests + 1 > p.requests_per_minute THEN
        RETURN 'requests_per_minute';
    ELSIF c.in_flight + 1 > p.max_concurrent_requests THEN
        RETURN 'max_concurrent_requests';
    END IF;
    RETURN NULL;  -- comparisons with an unset (NULL) limit are NULL: not a refusal
END $$
""",
    rf"""
CREATE FUNCTION quota_reserve(
    p_request_id text, p_tenant text, p_subject text, p_username text, p_key_id uuid,
    p_model text, p_endpoint text, p_prompt_tokens integer, p_max_tokens integer,
    p_context_length integer, p_now timestamptz, p_day date, p_month date,
    p_minute timestamptz, p_lease_until timestamptz,
    OUT outcome text, OUT scope text, OUT limit_value bigint, OUT reservation_id bigint,
    OUT tenant uuid, OUT granted_max_tokens integer, OUT reserved bigint,
    OUT tok_limit bigint, OUT tok_remaining bigint, OUT tok_window text,
    OUT req_limit bigint, OUT req_remaining bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    tp quota_policies;
    up quota_policies;
    v_models text[];
    v_cap integer;
    v_mode text;
    v_room integer;
    v_max integer;
    v_need bigint;
    ct quota_counters;
    cu quota_counters;
    v_day date;
    v_month date;
    v_minute timestamptz;
    v_left bigint;
BEGIN
    SELECT id, status INTO tenant, v_status FROM tenants WHERE name = p_tenant;
    IF NOT FOUND THEN outcome := 'unknown_tenant'; RETURN; END IF;
    IF v_status <> 'active' THEN outcome := 'suspended'; RETURN; END IF;

    SELECT * INTO tp FROM quota_policies WHERE tenant_id = tenant AND subject IS NULL;
    SELECT * INTO up FROM quota_policies WHERE tenant_id = tenant AND subject = p_subject;

    v_models := coalesce(up.allowed_models, tp.allowed_models);
    IF v_models IS NOT NULL AND NOT (p_model = ANY (v_models)) THEN
        outcome := 'model_not_allowed'; RETURN;
    END IF;

    v_room := p_context_length - p_prompt_tokens;
    IF v_room < 0 OR (v_room = 0 AND p_endpoint <> 'embeddings') THEN
        outcome := 'context_length_exceeded'; limit_value := p_context_length; RETURN;
    END IF;
    IF p_endpoint = 'embeddings' THEN
        v_max := 0;
    ELSE
        IF up.max_tokens_per_request IS NOT NULL THEN
            v_cap := up.max_tokens_per_request; v_mode := up.max_tokens_mode;
        ELSE
            v_cap := tp.max_tokens_per_request; v_mode := coalesce(tp.max_tokens_mode, 'cap');
        END IF;
        v_max := coalesce(p_max_tokens, v_room);
        IF v_cap IS NOT NULL AND v_max > v_cap THEN
            IF v_mode = 'reject' AND p_max_tokens IS NOT NULL THEN
                outcome := 'max_tokens_over_cap'; limit_value := v_cap; RETURN;
            END IF;
            v_max := v_cap;
        END IF;
        v_max := least(v_max, v_room);
    END IF;
    v_need := p_prompt_tokens + v_max;
    granted_max_tokens := v_max;
    reserved := v_need;

    ct := quota_lock_counter(tenant, '', p_day, p_month, p_minute);
    cu := quota_lock_counter(tenant, p_subject, p_day, p_month, p_minute);
    -- Roll both scopes to the newest window anyone has seen (tolerates ingress clock skew).
    v_day := greatest(p_day, ct.day_key, cu.day_key);
    v_month := greatest(p_month, ct.month_key, cu.month_key);
    v_minute := greatest(p_minute, ct.minute_key, cu.minute_key);
    IF ct.day_key < v_day THEN ct.day_key := v_day; ct.day_charged := 0; ct.day_reserved := 0; END IF;
    IF cu.day_key < v_day THEN cu.day_key := v_day; cu.day_charged := 0; cu.day_reserved := 0; END IF;
    IF ct.month_key < v_month THEN
        ct.month_key := v_month; ct.month_charged := 0; ct.month_reserved := 0;
    END IF;
    IF cu.month_key < v_month THEN
        cu.month_key := v_month; cu.month_charged := 0; cu.month_reserved := 0;
    END IF;
    IF ct.minute_key < v_minute THEN ct.minute_key := v_minute; ct.minute_requests := 0; END IF;
    IF cu.minute_key < v_minute THEN cu.minute_key := v_minute; cu.minute_requests := 0; END IF;

    outcome := quota_refusal(ct, tp, v_need);
    IF outcome IS NOT NULL THEN scope := 'tenant'; ELSE
        outcome := quota_refusal(cu, up, v_need);
        IF outcome IS NOT NULL THEN scope := 'user'; END IF;
    END IF;
    IF outcome IS NOT NULL THEN
        limit_value := CASE outcome
            WHEN 'tokens_per_day' THEN CASE scope WHEN 'tenant' THEN tp.tokens_per_day ELSE up.tokens_per_day END
            WHEN 'tokens_per_month' THEN CASE scope WHEN 'tenant' THEN tp.tokens_per_month ELSE up.tokens_per_month END
            WHEN 'requests_per_minute' THEN CASE scope WHEN 'tenant' THEN tp.requests_per_minute ELSE up.requests_per_minute END
            ELSE CASE scope WHEN 'tenant' THEN tp.max_concurrent_requests ELSE up.max_concurrent_requests END
        END;
        RETURN;
    END IF;

    ct.day_reserved := ct.day_reserved + v_need;
    ct.month_reserved := ct.month_reserved + v_need;
    ct.minute_requests := ct.minute_requests + 1;
    ct.in_flight := ct.in_flight + 1;
    cu.day_reserved := cu.day_reserved + v_need;
    cu.month_reserved := cu.month_reserved + v_need;
    cu.minute_requests := cu.minute_requests + 1;
    cu.in_flight := cu.in_flight + 1;
{store_counters(tenant_row="ct", user_row="cu", tenant="tenant", subject="p_subject")}

    INSERT INTO quota_reservations (request_id, tenant_id, subject, username, key_id, model,
        endpoint, prompt_tokens, max_tokens, reserved_tokens, day_key, month_key, started_at,
        lease_expires_at)
    VALUES (p_request_id, tenant, p_subject, p_username, p_key_id, p_model, p_endpoint,
        p_prompt_tokens, v_max, v_need, v_day, v_month, p_now, p_lease_until)
    RETURNING id INTO reservation_id;

    outcome := 'ok';
    -- Headers: the tightest token window and the tightest request window after this admission.
    FOREACH v_left IN ARRAY ARRAY[
        tp.tokens_per_day - ct.day_charged - ct.day_reserved,
        up.tokens_per_day - cu.day_charged - cu.day_reserved] LOOP
        IF v_left IS NOT NULL AND (tok_remaining IS NULL OR v_left < tok_remaining) THEN
            tok_remaining := v_left; tok_window := 'day';
        END IF;
    END LOOP;
    FOREACH v_left IN ARRAY ARRAY[
        tp.tokens_per_month - ct.month_charged - ct.month_reserved,
        up.tokens_per_month - cu.month_charged - cu.month_reserved] LOOP
        IF v_left IS NOT NULL AND (tok_remaining IS NULL OR v_left < tok_remaining) THEN
            tok_remaining := v_left; tok_window := 'month';
        END IF;
    END LOOP;
    tok_limit := CASE
        WHEN tok_window = 'day' AND tp.tokens_per_day - ct.day_charged - ct.day_reserved = tok_remaining
            THEN tp.tokens_per_day
        WHEN tok_window = 'day' THEN up.tokens_per_day
        WHEN tok_window = 'month' AND tp.tokens_per_month - ct.month_charged - ct.month_reserved = tok_remaining
            THEN tp.tokens_per_month
        WHEN tok_window = 'month' THEN up.tokens_per_month
    END;
    IF tp.requests_per_minute IS NOT NULL THEN
        req_limit := tp.requests_per_minute;
        req_remaining := tp.requests_per_minute - ct.minute_requests;
    END IF;
    IF up.requests_per_minute IS NOT NULL
       AND (req_remaining IS NULL OR up.requests_per_minute - cu.minute_requests < req_remaining) THEN
        req_limit := up.requests_per_minute;
        req_remaining := up.requests_per_minute - cu.minute_requests;
    END IF;
END $$
""",  # noqa: E501 - released SQL, kept byte for byte
    # Charges min(actual, reserved) to the windows the reservation was made in (if they are
    # still current: an earlier window is over and no longer enforced), frees the concurrency
    # slot, and writes the one ledger row. A second call finds no reservation: no-op, NULL.
    rf"""
CREATE FUNCTION quota_settle(p_reservation_id bigint, p_prompt_tokens integer,
    p_completion_tokens integer, p_status text, p_ttft_ms double precision,
    p_latency_ms double precision, p_finished_at timestamptz, OUT charged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r quota_reservations;
BEGIN
    DELETE FROM quota_reservations WHERE id = p_reservation_id RETURNING * INTO r;
    IF NOT FOUND THEN RETURN; END IF;
    charged := least(p_prompt_tokens::bigint + p_completion_tokens, r.reserved_tokens);
{settle_counters(charged="charged")}
    INSERT INTO usage_ledger (request_id, tenant_id, subject, username, key_id, model, endpoint,
        prompt_tokens, completion_tokens, total_tokens, status, ttft_ms, latency_ms, started_at,
        finished_at)
    VALUES (r.request_id, r.tenant_id, r.subject, r.username, r.key_id, r.model, r.endpoint,
        p_prompt_tokens, p_completion_tokens, p_prompt_tokens + p_completion_tokens, p_status,
        p_ttft_ms, p_latency_ms, r.started_at, p_finished_at)
    ON CONFLICT (request_id) DO NOTHING;
END $$
""",
    # Settles leases nobody renewed (their ingress died), charging the full reservation: the
    # dead ingress may have streamed up to max_tokens before it went. One reaper at a time.
    r"""
CREATE FUNCTION quota_reap(p_now timestamptz, p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('agencyllm.quota_reap')) THEN RETURN 0; END IF;
    -- Same lock order as the ledger's batches: tenant name, then subject (byte order).
    FOR r IN SELECT q.id, q.prompt_tokens, q.max_tokens, q.started_at
               FROM quota_reservations q JOIN tenants t ON t.id = q.tenant_id
              WHERE q.lease_expires_at < p_now
              ORDER BY t.name COLLATE "C", q.subject COLLATE "C" LIMIT p_limit
                FOR UPDATE OF q SKIP LOCKED LOOP
        PERFORM quota_settle(r.id, r.prompt_tokens, r.max_tokens, 'expired', NULL,
                             extract(epoch FROM p_now - r.started_at) * 1000, p_now);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$
""",
)
