"""Responses API: stored responses in Postgres, and `responses` as a ledger endpoint.

`stored_responses` holds the responses a tenant that keeps content asked to store (`store`, the
default): their input items and the whole response object, owned by the tenant and the caller,
linked to the response they continue (`previous_response_id`). Retention purges them with the
tenant's other content (quotas/compliance/retention.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "agencyllm_app"


def upgrade() -> None:
    op.drop_constraint("ck_usage_ledger_endpoint", "usage_ledger", type_="check")
    op.create_check_constraint(
        "ck_usage_ledger_endpoint", "usage_ledger", "endpoint IN ('chat', 'completions', 'embeddings', 'responses')"
    )
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("previous_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("input_items", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        # JSON text: a model's output may hold NUL (\u0000), which jsonb refuses.
        sa.Column("response", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_stored_responses_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stored_responses")),
    )
    op.create_index(
        op.f("ix_stored_responses_tenant_id_created_at"), "stored_responses", ["tenant_id", "created_at"], unique=False
    )
    op.execute(
        f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON stored_responses TO {APP_ROLE}';
    END IF;
END $$
"""
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_stored_responses_tenant_id_created_at"), table_name="stored_responses")
    op.drop_table("stored_responses")
    op.execute("DELETE FROM usage_ledger WHERE endpoint = 'responses'")
    op.drop_constraint("ck_usage_ledger_endpoint", "usage_ledger", type_="check")
    op.create_check_constraint(
        "ck_usage_ledger_endpoint", "usage_ledger", "endpoint IN ('chat', 'completions', 'embeddings')"
    )
