"""``webhook_secrets.previous_signs_until``: after a rotation, until when the tenant's events also
carry the previous secret's signature (fixed at the rotation, so the API and every worker agree,
and a later change of ``UISPS_WEBHOOK_SECRET_OVERLAP_S`` does not reach back).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06

Rotations made before this column existed get none: the old secret signed nothing after them,
as the service said then. The downgrade drops the column (events then carry one signature); an
upgrade after it restores each tenant's from its latest rotation's audit event, which records it.
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_secrets", sa.Column("previous_signs_until", sa.DateTime(timezone=True), nullable=True))
    _restore_overlaps()


def _restore_overlaps() -> None:
    """Found only after a downgrade past this revision: before it, no rotation recorded one."""
    connection = op.get_bind()
    events = connection.execute(sa.text(
        "SELECT tenant_id, details FROM audit_events WHERE action = 'webhook_secret.rotated' ORDER BY id"
    )).all()
    latest: dict[str, dict] = {}
    for tenant_id, details in events:
        latest[tenant_id] = json.loads(details) if isinstance(details, str) else details
    for tenant_id, details in latest.items():
        until = details.get("previous_signs_until")
        if until:
            value = datetime.fromisoformat(until)
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
            if connection.dialect.name == "sqlite":  # stored naive there, as the ORM's UTCDateTime does
                value = value.replace(tzinfo=None)
            statement = sa.text(
                "UPDATE webhook_secrets SET previous_signs_until = :until"
                " WHERE tenant_id = :tenant AND generation = :generation"
            ).bindparams(sa.bindparam("until", type_=sa.DateTime(timezone=True)))  # the dialect's own text form
            connection.execute(statement, {"until": value, "tenant": tenant_id, "generation": int(details["generation"])})


def downgrade() -> None:
    with op.batch_alter_table("webhook_secrets") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("previous_signs_until")
