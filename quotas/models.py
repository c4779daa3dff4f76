"""The quota schema as typed ORM classes. `migrations/versions` must match this file exactly
(tests/test_quota_schema.py checks with Alembic's autogenerate comparison)."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TENANT_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
TENANT_STATUSES = ("active", "suspended")
MAX_TOKENS_MODES = ("cap", "reject")
KEY_KINDS = ("personal", "service", "frontend")
ALL_TENANTS = "*"  # a front-end key that serves every tenant
# Classes of traffic for fair sharing (serving/gateway/fairshare.py) and the largest tenant share.
TRAFFIC_CLASSES = ("interactive", "batch")
MAX_SHARE = 1000
ENDPOINTS = ("chat", "completions", "embeddings", "responses")
USAGE_STATUSES = ("ok", "client_error", "engine_error", "cancelled", "expired")
AUDIT_CATEGORIES = ("auth", "request", "admin", "quota", "retention")
AUDIT_OUTCOMES = ("success", "failure", "refused")


class FeedbackCategory(StrEnum):
    """What staff say was wrong (or right) with a response: the feedback table's check, the API's
    schema and the CLI's choices all read this."""

    INACCURATE = "inaccurate"
    HARMFUL = "harmful"
    BIASED = "biased"
    UNHELPFUL = "unhelpful"
    HELPFUL = "helpful"
    OTHER = "other"


# The row of quota_counters that holds a tenant's aggregate (user rows hold the user's `sub`).
TENANT_SCOPE = ""


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _timestamp(**kwargs: Any) -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), **kwargs)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(f"name ~ '{TENANT_NAME_PATTERN}'", name="name_format"),
        CheckConstraint(_one_of("status", TENANT_STATUSES), name="status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )
    name: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    keycloak_group: Mapped[str | None] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    created_at: Mapped[datetime] = _timestamp()
    updated_at: Mapped[datetime] = _timestamp(onupdate=func.now())
    # Records-law opt-in: keep prompts and outputs this many days. NULL (default): never stored.
    content_retention_days: Mapped[int | None] = mapped_column(Integer)


class QuotaPolicy(Base):
    """subject NULL: the tenant-wide policy (limits the sum of all its users); else one user's
    override. Additive limits (budgets, RPM, concurrency) of a user row apply to that user on top
    of the tenant's; per-request fields (max_tokens_per_request, allowed_models) replace the
    tenant's where set."""

    __tablename__ = "quota_policies"
    __table_args__ = (
        UniqueConstraint("tenant_id", "subject", postgresql_nulls_not_distinct=True),
        CheckConstraint("tokens_per_day >= 0", name="tokens_per_day"),
        CheckConstraint("tokens_per_month >= 0", name="tokens_per_month"),
        CheckConstraint("requests_per_minute >= 0", name="requests_per_minute"),
        CheckConstraint("max_concurrent_requests >= 0", name="max_concurrent_requests"),
        CheckConstraint("max_tokens_per_request >= 0", name="max_tokens_per_request"),
        CheckConstraint(_one_of("max_tokens_mode", MAX_TOKENS_MODES), name="max_tokens_mode"),
        CheckConstraint(f"share IS NULL OR (share > 0 AND share <= {MAX_SHARE})", name="share"),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject: Mapped[str | None] = mapped_column(Text)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_requests: Mapped[int | None] = mapped_column(Integer)
    max_tokens_per_request: Mapped[int | None] = mapped_column(Integer)
    max_tokens_mode: Mapped[str] = mapped_column(String(8), default="cap", server_default="cap")
    allowed_models: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    # Weight of the tenant's claim on contended engine slots (tenant-wide policy only; NULL = 1).
    share: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = _timestamp(onupdate=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(_one_of("kind", KEY_KINDS), name="kind"),
        CheckConstraint(_one_of("traffic_class", TRAFFIC_CLASSES), name="traffic_class"),
        CheckConstraint(
            "(kind = 'frontend') = (serves_tenants IS NOT NULL AND cardinality(serves_tenants) > 0)",
            name="serves_tenants",
        ),
        Index(None, "tenant_id"),
        Index(None, "owner_subject"),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    # Requests made with the key run as this class unless they ask for batch themselves.
    traffic_class: Mapped[str] = mapped_column(String(16), default="interactive", server_default="interactive")
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    owner_subject: Mapped[str] = mapped_column(Text)
    owner_username: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _timestamp()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A front-end key's tenants: whose people it may act for (`ALL_TENANTS` for every tenant).
    serves_tenants: Mapped[list[str] | None] = mapped_column(ARRAY(Text))


class UsageRecord(Base):
    """One row per admitted request, written by settlement. No foreign keys: the ledger is
    history and outlives deleted tenants and keys."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        CheckConstraint(_one_of("endpoint", ENDPOINTS), name="endpoint"),
        CheckConstraint(_one_of("status", USAGE_STATUSES), name="status"),
        Index(None, "tenant_id", "started_at"),
        Index(None, "subject"),
        Index(None, "model"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, unique=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    subject: Mapped[str] = mapped_column(Text)
    username: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    model: Mapped[str] = mapped_column(Text)
    endpoint: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    total_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """One audit record (NIST 800-53 AU-3: what, when, where, source, outcome, who). Append-only
    and hash-chained: a trigger (migration 0002) sets seq, prev_hash and hash on insert; the
    application's database role may only insert. See docs/compliance/audit.md."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index(None, "at"),
        Index(None, "target_type", "target_id"),
        Index(None, "tenant", "at"),
        UniqueConstraint("seq"),
        CheckConstraint(_one_of("category", AUDIT_CATEGORIES), name="category"),
        CheckConstraint(_one_of("outcome", AUDIT_OUTCOMES), name="outcome"),
    )
    # Only the key comes back from an insert: the application role may not read the table.
    __mapper_args__ = {"eager_defaults": False}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = _timestamp()
    category: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")
    action: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16), default="success", server_default="success")
    actor_subject: Mapped[str] = mapped_column(Text)
    actor_username: Mapped[str | None] = mapped_column(Text)
    actor_client_id: Mapped[str | None] = mapped_column(Text)
    actor_key_id: Mapped[str | None] = mapped_column(Text)
    tenant: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    target_type: Mapped[str] = mapped_column(Text)
    target_id: Mapped[str | None] = mapped_column(Text)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The chain's last seq and hash; its row lock orders every audit writer."""

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class RequestContent(Base):
    """Prompt and output of one request, kept only for tenants that opted in, until their
    retention period ends (quotas/compliance/retention.py purges it)."""

    __tablename__ = "request_content"
    __table_args__ = (Index(None, "tenant_id", "created_at"),)

    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = _timestamp()
    prompt: Mapped[Any] = mapped_column(JSONB)
    output: Mapped[str | None] = mapped_column(Text)


class StoredResponse(Base):
    """One stored Responses API response (`store`, for tenants that keep content): its input items
    and the response object, owned by the tenant and the caller; purged with the tenant's content."""

    __tablename__ = "stored_responses"
    __table_args__ = (Index(None, "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(Text)
    previous_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _timestamp()
    input_items: Mapped[Any] = mapped_column(JSONB)
    # JSON text: a model's output may hold NUL (\u0000), which jsonb refuses.
    response: Mapped[str] = mapped_column(Text)


BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
BATCH_LINE_STATUSES = ("pending", "running", "done", "failed")


class StoredFile(Base):
    """An uploaded file (`/v1/files`) or a batch's output file, owned by the tenant and uploader."""

    __tablename__ = "files"
    __table_args__ = (Index(None, "tenant_id", "subject", "created_at"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    created_at: Mapped[datetime] = _timestamp()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    content: Mapped[bytes] = mapped_column(LargeBinary)


class BatchJob(Base):
    """A batch (`/v1/batches`): its owner, whose quotas its lines are charged to, and its progress."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(_one_of("status", BATCH_STATUSES), name="status"),
        Index(None, "tenant_id", "created_at"),
        Index(None, "status"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(Text)
    owner: Mapped[Any] = mapped_column(JSONB)
    endpoint: Mapped[str] = mapped_column(String(32))
    input_file_id: Mapped[str] = mapped_column(Text)
    completion_window: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _timestamp()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    output_file_id: Mapped[str | None] = mapped_column(Text)
    error_file_id: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[Any | None] = mapped_column(JSONB)
    metadata_: Mapped[Any | None] = mapped_column("metadata", JSONB)
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    completed: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")


class BatchLine(Base):
    """One input line of a batch: leased by a worker while it runs, ended once with its record."""

    __tablename__ = "batch_lines"
    __table_args__ = (
        CheckConstraint(_one_of("status", BATCH_LINE_STATUSES), name="status"),
        UniqueConstraint("batch_id", "custom_id"),
        Index(None, "status", postgresql_where=text("status IN ('pending', 'running')")),
    )

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(Text)
    body: Mapped[Any] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(12), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[str | None] = mapped_column(Text)  # JSON text (a model's output may hold NUL)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (
        Index(None, "tenant_id", "created_at"),
        CheckConstraint("rating BETWEEN 1 AND 5", name="rating"),
        CheckConstraint(_one_of("category", tuple(c.value for c in FeedbackCategory)), name="category"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    request_id: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    username: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[int | None] = mapped_column(SmallInteger)
    category: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _timestamp()


class PlatformSecret(Base):
    """Per-install secrets made by the migrations (e.g. the key behind tenants' cache salts)."""

    __tablename__ = "platform_secrets"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class QuotaCounter(Base):
    """Live counters of one scope: a tenant (subject = TENANT_SCOPE) or one user in it.
    Windows roll lazily: a counter whose *_key is older than the current window counts as 0.
    Internal to the ledger; written only by the plpgsql functions in the migration."""

    __tablename__ = "quota_counters"
    # Room on each page for HOT updates: every admission and settlement rewrites its rows.
    __table_args__ = {"postgresql_with": {"fillfactor": 50}}

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    subject: Mapped[str] = mapped_column(Text, primary_key=True)
    day_key: Mapped[date] = mapped_column(Date)
    day_charged: Mapped[int] = mapped_column(BigInteger, server_default="0")
    day_reserved: Mapped[int] = mapped_column(BigInteger, server_default="0")
    month_key: Mapped[date] = mapped_column(Date)
    month_charged: Mapped[int] = mapped_column(BigInteger, server_default="0")
    month_reserved: Mapped[int] = mapped_column(BigInteger, server_default="0")
    minute_key: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    minute_requests: Mapped[int] = mapped_column(Integer, server_default="0")
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")


class QuotaReservation(Base):
    """An admitted request not yet settled. day_key/month_key: the windows it reserved in (and
    is charged to). lease_expires_at: renewed by the owning ingress; the reaper settles the rest."""

    __tablename__ = "quota_reservations"
    __table_args__ = (Index(None, "lease_expires_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, unique=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(Text)
    username: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    model: Mapped[str] = mapped_column(Text)
    endpoint: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    reserved_tokens: Mapped[int] = mapped_column(BigInteger)
    day_key: Mapped[date] = mapped_column(Date)
    month_key: Mapped[date] = mapped_column(Date)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
