"""Fair shares of the workers between tenants: a request's place in the broker's queue.

Each request is sent with a priority, the number of its tenant's requests queued or running that
were made before it (at most 9), and workers take the lowest number first (core.broker: ten
priority levels on Redis). So every tenant's first waiting request goes before any tenant's
second, its second before any third, and so on up to the tenth; past that, first come, first
served. A tenant that sends fifty requests at once takes one worker's turn in each round, not
the next fifty turns, and the 50-active cap (UISPS_MAX_ACTIVE_REQUESTS_PER_TENANT) still bounds
what it holds in all.

The priority is fixed when a message is sent (a Celery retry keeps it); the reconciler works it
out again for what it re-sends.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db import DeletionRequest, JobState

PRIORITY_LEVELS = 10  # 0 (taken first) to 9: what kombu's Redis transport offers

_table = DeletionRequest.__table__
_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


def dispatch_priority(ahead: int) -> int:
    """The priority of a request with `ahead` of its tenant's requests before it (0 is taken first)."""
    return max(0, min(PRIORITY_LEVELS - 1, ahead))


def priorities(session: Session, request_ids: Iterable[str]) -> dict[str, int]:
    """Each request's priority now (for a re-send); the ids that do not exist are left out."""
    wanted = list(request_ids)
    if not wanted:
        return {}
    earlier = _table.alias("earlier")
    ahead = (
        select(func.count())
        .select_from(earlier)
        .where(
            earlier.c.tenant_id == _table.c.tenant_id,
            earlier.c.state.in_(_ACTIVE),
            earlier.c.created_at < _table.c.created_at,
        )
        .scalar_subquery()
    )
    rows = session.execute(select(_table.c.id, ahead).where(_table.c.id.in_(wanted)))
    return {request_id: dispatch_priority(count) for request_id, count in rows}
