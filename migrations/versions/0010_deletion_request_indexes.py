"""Indexes for the scans every worker and scrape runs on ``deletion_requests``, a table that only
grows (requests are never deleted):

- ``ix_deletion_requests_active``: the queued and running requests only (a partial index, so its
  size follows the backlog, not the history): each reconciler pass's candidates and their tenants'
  fair-share counts, the active-request limit, and the requests on a version being purged.
- ``ix_deletion_requests_tenant_created``: a tenant's list, newest first, page after page.
- ``ix_deletion_requests_state_finished``: ``/metrics`` (requests per state; the latest succeeded).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

On PostgreSQL each index is built with a plain ``CREATE INDEX``, which holds off writes to the
table while it builds (seconds for a million rows): an API and workers left running through the
upgrade wait that long for their writes (new requests, progress, lease renewals), well within a
lease. The downgrade drops the three indexes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    op.create_index(
        "ix_deletion_requests_active", "deletion_requests", ["tenant_id", "created_at"],
        postgresql_where=ACTIVE, sqlite_where=ACTIVE,
    )
    op.create_index("ix_deletion_requests_tenant_created", "deletion_requests", ["tenant_id", "created_at", "id"])
    op.create_index("ix_deletion_requests_state_finished", "deletion_requests", ["state", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_deletion_requests_state_finished", table_name="deletion_requests")
    op.drop_index("ix_deletion_requests_tenant_created", table_name="deletion_requests")
    op.drop_index("ix_deletion_requests_active", table_name="deletion_requests")
