"""``webhook_secrets``: the generation of each tenant's webhook signing secret, which rotating it
moves on (the secret itself is derived from ``UISPS_WEBHOOK_SECRET``, never stored).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Tenants without a row are at generation 0, the secret they read before this table existed. The
downgrade drops the table: every tenant's events are then signed with its generation-0 secret.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_webhook_secrets")),
    )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
