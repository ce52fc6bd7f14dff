"""``webhook_secrets``: the generation of each tenant's webhook signing secret, which rotating it
moves on (the secret itself is derived from ``UISPS_WEBHOOK_SECRET``, never stored).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Tenants without a row are at generation 0, the secret they read before this table existed. The
downgrade drops the table: every tenant's events are then signed with its generation-0 secret. An
upgrade after it restores each tenant's generation from the audit log (``webhook_secret.rotated``
names it), so a secret a tenant rotated away from, perhaps because it leaked, is not used again.
"""

import json
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
    _restore_rotations()


def _restore_rotations() -> None:
    """Each tenant's latest rotation, from the audit log (found only after a downgrade past this
    revision: before it, no secret was rotated)."""
    connection = op.get_bind()
    events = connection.execute(sa.text(
        "SELECT tenant_id, occurred_at, details FROM audit_events WHERE action = 'webhook_secret.rotated' ORDER BY id"
    )).all()
    latest: dict[str, tuple[int, object]] = {}
    for tenant_id, occurred_at, details in events:
        details = json.loads(details) if isinstance(details, str) else details
        latest[tenant_id] = (int(details["generation"]), occurred_at)
    for tenant_id, (generation, rotated_at) in latest.items():
        connection.execute(
            sa.text("INSERT INTO webhook_secrets (tenant_id, generation, rotated_at) VALUES (:tenant, :generation, :at)"),
            {"tenant": tenant_id, "generation": generation, "at": rotated_at},
        )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
