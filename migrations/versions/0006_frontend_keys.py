"""Front-end keys: a key kind for a trusted chat front end that forwards the signed-in person.

- `api_keys.kind` may be `frontend` (minted by platform admins only, in the `system` tenant).
- `api_keys.serves_tenants`: the tenants whose people a front-end key may act for (`*`: all).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("serves_tenants", postgresql.ARRAY(sa.Text()), nullable=True))
    op.drop_constraint("ck_api_keys_kind", "api_keys", type_="check")
    op.create_check_constraint("ck_api_keys_kind", "api_keys", "kind IN ('personal', 'service', 'frontend')")
    op.create_check_constraint(
        "ck_api_keys_serves_tenants",
        "api_keys",
        "(kind = 'frontend') = (serves_tenants IS NOT NULL AND cardinality(serves_tenants) > 0)",
    )


def downgrade() -> None:
    op.execute("DELETE FROM api_keys WHERE kind = 'frontend'")
    op.drop_constraint("ck_api_keys_serves_tenants", "api_keys", type_="check")
    op.drop_constraint("ck_api_keys_kind", "api_keys", type_="check")
    op.create_check_constraint("ck_api_keys_kind", "api_keys", "kind IN ('personal', 'service')")
    op.drop_column("api_keys", "serves_tenants")
