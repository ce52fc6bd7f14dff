"""Drop ``api_keys.rate_tokens`` and ``api_keys.rate_updated_at``, unused since the rate limit's
buckets moved out of the database (one write per request serialised every request of a key;
core.services.api_keys.rate_limit).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

The downgrade adds them back empty (NULL), which is what every row held when they were last read.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite cannot drop a column in every version: batch mode rebuilds the table (rows kept).
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("rate_updated_at")
        batch_op.drop_column("rate_tokens")


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("rate_tokens", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rate_updated_at", sa.Float(), nullable=True))
