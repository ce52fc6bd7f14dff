"""Purging a version's checkpoint: ``model_versions.checkpoint_purged_at`` and an index on
``model_versions.artifact_key`` (a purge deletes the bytes only when no other version names them).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

The downgrade drops both; a purged version then reads as an ordinary one whose checkpoint is
missing from storage (downloads answer 500 ``artifact_missing``), which is what it is. The upgrade
sets the column from the audit log's ``model_version.checkpoint_purged`` events, so a downgrade
and upgrade again loses no purge.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.add_column(sa.Column("checkpoint_purged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_model_versions_artifact_key"), ["artifact_key"], unique=False)
    op.execute(
        "UPDATE model_versions SET checkpoint_purged_at = ("
        " SELECT MIN(occurred_at) FROM audit_events WHERE action = 'model_version.checkpoint_purged'"
        " AND subject_type = 'model_version' AND subject_id = model_versions.id)"
        " WHERE id IN (SELECT subject_id FROM audit_events WHERE action = 'model_version.checkpoint_purged'"
        " AND subject_type = 'model_version')"
    )


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_artifact_key"))
        batch_op.drop_column("checkpoint_purged_at")
