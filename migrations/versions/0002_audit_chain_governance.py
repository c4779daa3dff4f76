"""Tamper-evident audit trail, data governance and feedback (long: a released migration stays whole).

- `audit_events` becomes a hash chain: a BEFORE INSERT trigger gives every row the next `seq`,
  the previous row's hash and its own hash, serialised on the one-row `audit_chain_head` (its row
  lock is the chain's mutex, held to commit, so concurrent writers in any process stay in order).
- Settlement writes the model-request audit record in the same statement that writes the ledger
  row (`quota_settle_many`), after all counter locks: a writer holding the chain never waits for
  anything else, so settle batches, the reaper and admin transactions cannot deadlock.
- Roles: `agencyllm_app` (the platform: INSERT only on the audit table) and
  `agencyllm_audit_reader` (SELECT on the audit table). docs/compliance/audit.md maps database
  users onto them.
- Tenants may opt in to content retention (`content_retention_days`); kept content lives in
  `request_content`. `feedback` holds the feedback channel. `platform_secrets` holds the per-install
  secret behind each tenant's vLLM `cache_salt`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from agencyllm.migrations.plpgsql import settle_counters

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "agencyllm_app"
READER_ROLE = "agencyllm_audit_reader"
GENESIS_HASH = "0" * 64
# AU-11 (FedRAMP): audit records stay online at least this long, whatever a caller asks for.
AUDIT_FLOOR_DAYS = 90


def upgrade() -> None:
    for column in (
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("category", sa.String(16), server_default="admin", nullable=False),
        sa.Column("outcome", sa.String(16), server_default="success", nullable=False),
        sa.Column("tenant", sa.Text(), nullable=True),
        sa.Column("actor_client_id", sa.Text(), nullable=True),
        sa.Column("actor_key_id", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("details", postgresql.JSONB(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("hash", sa.String(64), nullable=True),
    ):
        op.add_column("audit_events", column)
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_chain_head_one_row"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_chain_head"),
    )
    op.execute(f"INSERT INTO audit_chain_head (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}')")
    for statement in FUNCTIONS:
        op.execute(statement)
    # Chain the rows written before this revision, in id order, through the same trigger path.
    op.execute("""
DO $$
DECLARE r audit_events;
BEGIN
    FOR r IN SELECT * FROM audit_events ORDER BY id LOOP
        r := audit_chain_link(r);
        UPDATE audit_events SET seq = r.seq, prev_hash = r.prev_hash, hash = r.hash
         WHERE id = r.id;
    END LOOP;
END $$
""")
    op.alter_column("audit_events", "seq", nullable=False)
    op.alter_column("audit_events", "prev_hash", nullable=False)
    op.alter_column("audit_events", "hash", nullable=False)
    op.create_unique_constraint("uq_audit_events_seq", "audit_events", ["seq"])
    op.create_index("ix_audit_events_tenant_at", "audit_events", ["tenant", "at"])
    op.create_check_constraint(
        "ck_audit_events_category", "audit_events", "category IN ('auth', 'request', 'admin', 'quota', 'retention')"
    )
    op.create_check_constraint(
        "ck_audit_events_outcome", "audit_events", "outcome IN ('success', 'failure', 'refused')"
    )
    op.execute("""
CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
FOR EACH ROW EXECUTE FUNCTION audit_chain_insert()
""")
    # No UPDATE, DELETE or TRUNCATE through any trigger-respecting path, even for the owner.
    op.execute("""
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
FOR EACH ROW WHEN (current_setting('agencyllm.audit_purge', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION audit_refuse_change()
""")

    op.add_column("tenants", sa.Column("content_retention_days", sa.Integer(), nullable=True))
    op.create_check_constraint(
        "ck_tenants_content_retention_days", "tenants", "content_retention_days BETWEEN 1 AND 36500"
    )
    op.create_table(
        "request_content",
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("prompt", postgresql.JSONB(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_request_content_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("request_id", name="pk_request_content"),
    )
    op.create_index("ix_request_content_tenant_id_created_at", "request_content", ["tenant_id", "created_at"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=True),
        sa.Column("rating", sa.SmallInteger(), nullable=True),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("rating BETWEEN 1 AND 5", name="ck_feedback_rating"),
        sa.CheckConstraint(
            "category IN ('inaccurate', 'harmful', 'biased', 'unhelpful', 'helpful', 'other')",
            name="ck_feedback_category",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_feedback_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
    )
    op.create_index("ix_feedback_tenant_id_created_at", "feedback", ["tenant_id", "created_at"])
    op.create_table(
        "platform_secrets",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_platform_secrets"),
    )
    # 256 bits from Postgres' strong random source (gen_random_uuid: 122 random bits each).
    op.execute("""
INSERT INTO platform_secrets (name, value) VALUES ('cache_salt',
    encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text
                             || gen_random_uuid()::text, 'UTF8')), 'hex'))
""")
    for statement in GRANTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
    op.execute("DROP TRIGGER IF EXISTS audit_events_chain ON audit_events")
    for name in FUNCTION_SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {name}")
    # Restore 0001's reaper (it settles through quota_settle, which 0001 still defines).
    from importlib import import_module

    initial = import_module("agencyllm.migrations.versions.0001_initial")
    op.execute(next(f for f in initial.FUNCTIONS if "FUNCTION quota_reap" in f))
    for table in ("platform_secrets", "feedback", "request_content", "audit_chain_head"):
        op.drop_table(table)
    # Dropping a column drops the constraints and indexes on it.
    op.drop_column("tenants", "content_retention_days")
    for column in (
        "hash",
        "prev_hash",
        "details",
        "request_id",
        "source",
        "actor_key_id",
        "actor_client_id",
        "tenant",
        "outcome",
        "category",
        "seq",
    ):
        op.drop_column("audit_events", column)


FUNCTION_SIGNATURES = (
    "audit_purge(timestamptz, integer)",
    "quota_reap(timestamptz, integer)",
    "quota_settle_many(bigint[], integer[], integer[], text[], double precision[], "
    "double precision[], timestamptz, text[], text[])",
    "audit_refuse_change()",
    "audit_chain_insert()",
    "audit_chain_link(audit_events)",
    "audit_canonical(audit_events)",
)

FUNCTIONS = (
    # What a record's hash covers: every column but the hash itself, as jsonb text (keys in
    # jsonb's fixed order, so the text is the same for the same values on any server).
    r"""
CREATE FUNCTION audit_canonical(e audit_events) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
SELECT jsonb_build_object(
    'seq', e.seq, 'id', e.id,
    'at', to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'category', e.category, 'action', e.action, 'outcome', e.outcome,
    'actor_subject', e.actor_subject, 'actor_username', e.actor_username,
    'actor_client_id', e.actor_client_id, 'actor_key_id', e.actor_key_id,
    'tenant', e.tenant, 'source', e.source, 'request_id', e.request_id,
    'target_type', e.target_type, 'target_id', e.target_id,
    'before', e.before, 'after', e.after, 'details', e.details,
    'prev_hash', e.prev_hash)::text
$$
""",
    # Links `e` to the chain's head and advances the head. The head's row lock, held until
    # commit, orders all writers; a writer must not take other locks after this (see above).
    r"""
CREATE FUNCTION audit_chain_link(INOUT e audit_events)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    h audit_chain_head;
BEGIN
    SELECT * INTO h FROM audit_chain_head WHERE id = 1 FOR UPDATE;
    e.seq := h.seq + 1;
    e.prev_hash := h.hash;
    e.hash := encode(sha256(convert_to(audit_canonical(e), 'UTF8')), 'hex');
    UPDATE audit_chain_head SET seq = e.seq, hash = e.hash WHERE id = 1;
END $$
""",
    r"""
CREATE FUNCTION audit_chain_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF NEW.at IS NULL THEN NEW.at := now(); END IF;
    NEW := audit_chain_link(NEW);
    RETURN NEW;
END $$
""",
    r"""
CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$
""",
    # Settles many reservations (same semantics as 0001's quota_settle, row by row, in array
    # order) and then writes one model-request audit record per settled reservation, all in
    # one statement: the audit record costs no extra round trip. Returns (n, charged) per input;
    # charged is NULL for a reservation settled before (idempotent no-op, no second record).
    rf"""
CREATE FUNCTION quota_settle_many(p_ids bigint[], p_prompt integer[], p_completion integer[],
    p_status text[], p_ttft double precision[], p_latency double precision[],
    p_finished_at timestamptz, p_client_ids text[], p_sources text[])
RETURNS TABLE (n integer, charged bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r quota_reservations;
    v_charged bigint;
    done_rows quota_reservations[] := '{{}}';
    done_n integer[] := '{{}}';
    done_charged bigint[] := '{{}}';
    j integer := 0;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        DELETE FROM quota_reservations WHERE id = p_ids[i] RETURNING * INTO r;
        IF NOT FOUND THEN
            n := i; charged := NULL; RETURN NEXT; CONTINUE;
        END IF;
        v_charged := least(p_prompt[i]::bigint + p_completion[i], r.reserved_tokens);
        -- Tenant row before the user row: the lock order of quota_reserve.
{settle_counters(charged="v_charged", indent="        ")}
        INSERT INTO usage_ledger (request_id, tenant_id, subject, username, key_id, model,
            endpoint, prompt_tokens, completion_tokens, total_tokens, status, ttft_ms,
            latency_ms, started_at, finished_at)
        VALUES (r.request_id, r.tenant_id, r.subject, r.username, r.key_id, r.model, r.endpoint,
            p_prompt[i], p_completion[i], p_prompt[i] + p_completion[i], p_status[i],
            p_ttft[i], p_latency[i], r.started_at, p_finished_at)
        ON CONFLICT (request_id) DO NOTHING;
        done_rows := done_rows || r;
        done_n := done_n || i;
        done_charged := done_charged || v_charged;
        n := i; charged := v_charged; RETURN NEXT;
    END LOOP;
    -- Last, after every counter lock: see audit_chain_link.
    FOREACH r IN ARRAY done_rows LOOP
        j := j + 1;
        INSERT INTO audit_events (at, category, action, outcome, actor_subject, actor_username,
            actor_client_id, actor_key_id, tenant, source, request_id, target_type, target_id,
            details)
        VALUES (p_finished_at, 'request', 'model.request',
            CASE WHEN p_status[done_n[j]] = 'ok' THEN 'success' ELSE 'failure' END,
            r.subject, r.username, p_client_ids[done_n[j]], r.key_id::text,
            (SELECT name FROM tenants WHERE id = r.tenant_id), p_sources[done_n[j]],
            r.request_id, 'model', r.model,
            jsonb_build_object('endpoint', r.endpoint, 'status', p_status[done_n[j]],
                'prompt_tokens', p_prompt[done_n[j]],
                'completion_tokens', p_completion[done_n[j]],
                'total_tokens', p_prompt[done_n[j]] + p_completion[done_n[j]],
                'charged_tokens', done_charged[j],
                'started_at', to_char(r.started_at AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')));
    END LOOP;
END $$
""",
    # 0001's reaper, settling through quota_settle_many so reaped requests are audited too.
    r"""
CREATE OR REPLACE FUNCTION quota_reap(p_now timestamptz, p_limit integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_ids bigint[] := '{}';
    v_prompt integer[] := '{}';
    v_max integer[] := '{}';
    v_latency double precision[] := '{}';
    v_count integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('agencyllm.quota_reap')) THEN RETURN 0; END IF;
    -- Same lock order as the ledger's batches: tenant name, then subject (byte order).
    FOR r IN SELECT q.id, q.prompt_tokens, q.max_tokens, q.started_at
               FROM quota_reservations q JOIN tenants t ON t.id = q.tenant_id
              WHERE q.lease_expires_at < p_now
              ORDER BY t.name COLLATE "C", q.subject COLLATE "C" LIMIT p_limit
                FOR UPDATE OF q SKIP LOCKED LOOP
        v_ids := v_ids || r.id;
        v_prompt := v_prompt || r.prompt_tokens;
        v_max := v_max || r.max_tokens;
        v_latency := v_latency || (extract(epoch FROM p_now - r.started_at) * 1000)::double precision;
    END LOOP;
    v_count := coalesce(array_length(v_ids, 1), 0);
    IF v_count = 0 THEN RETURN 0; END IF;
    PERFORM quota_settle_many(v_ids, v_prompt, v_max, array_fill('expired'::text, ARRAY[v_count]),
        array_fill(NULL::double precision, ARRAY[v_count]), v_latency, p_now,
        array_fill(NULL::text, ARRAY[v_count]), array_fill('reaper'::text, ARRAY[v_count]));
    RETURN v_count;
END $$
""",
    # Deletes the oldest audit records, never any younger than the floor, and only a prefix of
    # the chain (so what is left still verifies), then records the purge itself: the purge
    # record names the last purged seq and hash, which `audit verify` checks the new first
    # record against. The clock is the caller's but never later than the server's.
    rf"""
CREATE FUNCTION audit_purge(p_now timestamptz, p_keep_days integer,
    OUT purged bigint, OUT through_seq bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_hash text;
BEGIN
    IF p_keep_days IS NULL OR p_keep_days < {AUDIT_FLOOR_DAYS} THEN
        RAISE EXCEPTION 'audit records are kept at least {AUDIT_FLOOR_DAYS} days (asked: %)',
            p_keep_days USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_cutoff := least(p_now, now()) - make_interval(days => p_keep_days);
    PERFORM 1 FROM audit_chain_head WHERE id = 1 FOR UPDATE;  -- no writer meanwhile
    -- The end of the prefix of records all older than the cutoff.
    SELECT coalesce(min(seq) - 1, (SELECT max(seq) FROM audit_events)) INTO through_seq
      FROM audit_events WHERE at >= v_cutoff;
    purged := 0;
    IF through_seq IS NULL OR through_seq < coalesce((SELECT min(seq) FROM audit_events), 0) THEN
        through_seq := NULL;
        RETURN;
    END IF;
    SELECT hash INTO v_hash FROM audit_events WHERE seq = through_seq;
    IF v_hash IS NULL THEN through_seq := NULL; RETURN; END IF;
    PERFORM set_config('agencyllm.audit_purge', 'on', true);
    DELETE FROM audit_events WHERE seq <= through_seq;
    GET DIAGNOSTICS purged = ROW_COUNT;
    PERFORM set_config('agencyllm.audit_purge', 'off', true);
    INSERT INTO audit_events (at, category, action, outcome, actor_subject, actor_username,
        target_type, target_id, details)
    VALUES (least(p_now, now()), 'retention', 'audit.purge', 'success', 'system', 'retention',
        'audit_events', NULL,
        jsonb_build_object('purged', purged, 'through_seq', through_seq,
                           'through_hash', v_hash, 'keep_days', p_keep_days,
                           'cutoff', to_char(v_cutoff AT TIME ZONE 'UTC',
                                             'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')));
END $$
""",
)

# Roles are cluster-wide: created once (a DBA may create them beforehand), granted per database.
GRANTS = (
    rf"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        CREATE ROLE {APP_ROLE} NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
        CREATE ROLE {READER_ROLE} NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'cannot create roles {APP_ROLE} and {READER_ROLE}: ask a DBA to create them '
                  '(NOLOGIN) and rerun the grants in docs/compliance/audit.md';
END $$
""",
    rf"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN RETURN; END IF;
    EXECUTE 'GRANT USAGE ON SCHEMA public TO {APP_ROLE}, {READER_ROLE}';
    EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, quota_policies, api_keys,
             usage_ledger, quota_counters, quota_reservations, request_content, feedback
             TO {APP_ROLE}';
    EXECUTE 'GRANT SELECT ON platform_secrets, alembic_version TO {APP_ROLE}';
    EXECUTE 'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}';
    EXECUTE 'REVOKE ALL ON audit_events, audit_chain_head FROM PUBLIC';
    -- Insert only; `id` readable so an INSERT … RETURNING id (the ORM's) works.
    EXECUTE 'GRANT INSERT, SELECT (id) ON audit_events TO {APP_ROLE}';
    EXECUTE 'GRANT SELECT ON audit_events, audit_chain_head TO {READER_ROLE}';
    EXECUTE 'REVOKE EXECUTE ON FUNCTION audit_purge(timestamptz, integer),
             audit_chain_link(audit_events) FROM PUBLIC';
    EXECUTE 'GRANT EXECUTE ON FUNCTION audit_purge(timestamptz, integer) TO {APP_ROLE}';
END $$
""",
)
