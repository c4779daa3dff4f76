"""Fair sharing: a tenant's `share` of contended engine slots, and each API key's traffic class.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("quota_policies", sa.Column("share", sa.Float(), nullable=True))
    op.create_check_constraint(
        "ck_quota_policies_share", "quota_policies", "share IS NULL OR (share > 0 AND share <= 1000)"
    )
    op.add_column(
        "api_keys",
        sa.Column("traffic_class", sa.String(length=16), server_default="interactive", nullable=False),
    )
    op.create_check_constraint("ck_api_keys_traffic_class", "api_keys", "traffic_class IN ('interactive', 'batch')")


def downgrade() -> None:
    op.drop_constraint("ck_api_keys_traffic_class", "api_keys", type_="check")
    op.drop_column("api_keys", "traffic_class")
    op.drop_constraint("ck_quota_policies_share", "quota_policies", type_="check")
    op.drop_column("quota_policies", "share")
