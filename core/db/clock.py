"""How far this machine's clock is from the database server's.

A worker writes its job's lease as its own time plus `job_lease_s`, and every other worker (and
its reconciler) compares that with its own time: a worker whose clock runs behind writes leases
the others already see as expired, and its jobs are taken over again and again until they fail
with `worker_lost`. The database server's clock is the one every machine can compare itself with.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import URL

from core.db.base import utcnow
from core.db.session import make_engine


def clock_offset_s(url: str | URL) -> float | None:
    """Seconds this machine's clock is ahead of the PostgreSQL server's (negative: behind),
    measured against the midpoint of the round trip; None for SQLite, which runs on this machine."""
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            return None
        with engine.connect() as connection:
            sent = utcnow()
            server = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
            answered = utcnow()
    finally:
        engine.dispose()
    return ((sent - server) + (answered - server)).total_seconds() / 2


def clock_problem(url: str | URL, lease_s: float) -> str | None:
    """Why this machine's clock is too far from the database's for its leases to be read right
    (more than a quarter of the lease, which the heartbeat renews every third of it), or None."""
    offset = clock_offset_s(url)
    if offset is None or abs(offset) <= lease_s / 4:
        return None
    side = "ahead of" if offset > 0 else "behind"
    return (f"this machine's clock is {abs(offset):.0f} s {side} the database server's, more than a quarter of "
            f"the job lease ({lease_s:g} s, UISPS_JOB_LEASE_S): workers would misread each other's leases "
            "(taking over live jobs, or leaving dead ones); synchronise the clocks (NTP)")
