"""Transaction helpers shared by the services: write locks and work deferred until commit."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event, text
from sqlalchemy.orm import Session, SessionTransaction

logger = logging.getLogger(__name__)

_AFTER_COMMIT = "uisps.after_commit"
# First key of PostgreSQL's two-key advisory locks on artifacts (the audit chain uses 0x75697370).
_ARTIFACT_LOCK_NAMESPACE = 0x75697371


def begin_write(session: Session) -> None:
    """Start the session's transaction as a writer; call it before the transaction's first read.

    SQLite in WAL mode refuses (``database is locked``, at once, whatever the busy timeout) a
    transaction that read a snapshot and then tries to write after another connection committed,
    which the worker does every half second while it reports progress. Taking the write lock
    first makes such a transaction wait its turn instead. PostgreSQL needs nothing here; row locks
    (``model_repository.get(..., for_update=True)``) and advisory locks serialise what must be
    serialised there.
    """
    if session.get_bind().dialect.name != "sqlite":
        return
    if session.in_transaction() and session.info.get("uisps.writer"):
        return
    # A write that matches no row still takes SQLite's single write lock (waits on busy_timeout).
    session.execute(text("UPDATE models SET id = id WHERE 0 = 1"))
    session.info["uisps.writer"] = True


def lock_artifact(session: Session, key: str, *, exclusive: bool) -> None:
    """Serialise a purge or `uisps artifacts gc` (exclusive) with the writes that add a version
    naming the same stored artifact (shared) until the transaction ends.

    Artifacts are content-addressed, so two versions can share one file: a purge deletes it only
    when no other unpurged version names it, and this lock keeps a version being added meanwhile
    from ending up pointing at a deleted file. On SQLite ``begin_write`` already holds the single
    write lock, which serialises the same transactions.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.execute(
        text(f"SELECT {function}(:namespace, hashtext(:key))"),
        {"namespace": _ARTIFACT_LOCK_NAMESPACE, "key": key},
    )


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction has committed; drop it on rollback.

    Used to hand a deletion request to the broker only once its row exists for everyone, so a
    worker can never receive an id it cannot read (and a rolled-back request is never sent).
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(_AFTER_COMMIT, []):
        try:
            callback()
        except Exception:
            # The commit stands whatever happens here: the row is the truth and the worker's
            # reconciler re-sends requests whose message was lost.
            logger.exception("after-commit callback failed")


@event.listens_for(Session, "after_transaction_end")
def _forget_transaction_state(session: Session, transaction: SessionTransaction) -> None:
    # Runs after `after_commit`; covers rollback and close too, so nothing outlives its transaction.
    if transaction.parent is None:
        session.info.pop("uisps.writer", None)
        session.info.pop(_AFTER_COMMIT, None)
