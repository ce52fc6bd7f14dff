"""``deletion_requests.follows_latest``: a request made without ``base_version`` unlearns from the
model's latest version when its job starts, not from the one that was latest when it was made
(two such requests that ran apart both started from that version, and the newer result forgot
only its own labels).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Rows that exist before the upgrade keep their base version (false): what they were made with is
not recorded. The downgrade drops the column; every request then keeps the base it was made with.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch_op:
        batch_op.add_column(sa.Column("follows_latest", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch_op:
        batch_op.drop_column("follows_latest")
