"""``webhook_secrets.previous_signs_until``: after a rotation, until when the tenant's events also
carry the previous secret's signature (fixed at the rotation, so the API and every worker agree,
and a later change of ``UISPS_WEBHOOK_SECRET_OVERLAP_S`` does not reach back).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Rotations made before this column existed get none: the old secret signed nothing after them,
as the service said then. The downgrade drops the column (events then carry one signature).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_secrets", sa.Column("previous_signs_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_secrets") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("previous_signs_until")
