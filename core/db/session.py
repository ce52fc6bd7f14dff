"""Engine and session factories with the per-backend settings the service relies on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The database is away or busy for now, not refusing what was asked: the same statement may well
# succeed shortly. OperationalError: cannot connect, connection lost, SQLite busy past its
# timeout; InterfaceError: the driver lost its connection; PoolTimeout: the pool had no connection.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
# A pooled connection that sat unused for longer than this is pinged (one round trip) before it is
# handed out, and replaced if the server dropped it (a restart, an idle timeout); one returned
# moments ago is not: under load almost no checkout pays for a ping. (SQLAlchemy's pool_pre_ping
# pings at every checkout: a round trip per request on the polling path.)
PING_AFTER_IDLE_S = 1.0
_RETURNED_AT = "uisps.returned_at"


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout, foreign keys and real transactions;
    others a ping of connections that were idle (see PING_AFTER_IDLE_S) unless `pool_pre_ping`."""
    url = make_url(url)
    # Errors name the statement, not its values: they reach logs and, through a job's failure,
    # could reach a tenant, and the values are what clients sent (callback URLs with tokens).
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        return _make_sqlite_engine(url, **kwargs)
    if url.get_backend_name() == "postgresql":
        # Set, not assumed: the audit chain's lock-then-read-the-tail (core/db/audit.py) needs
        # READ COMMITTED, and a role or pooler may default to REPEATABLE READ, which forks it.
        kwargs.setdefault("isolation_level", "READ COMMITTED")
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _handed_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get(_RETURNED_AT)
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool drops this connection and checks out a fresh one (up to three tries).
            raise DisconnectionError(f"pooled connection lost while idle: {exc}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: API handlers serialise rows after committing them.
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for work that only reads. On PostgreSQL each statement commits by itself
    (autocommit), which at READ COMMITTED sees what a transaction would, without the BEGIN and
    COMMIT round trips; the pool is the engine's. SQLite keeps its usual sessions."""
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")  # type: ignore[assignment]
    return sessionmaker(bind=engine, expire_on_commit=False)


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _make_sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    path = sqlite_file(url)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 driver: in its legacy mode SELECTs run outside any
    # transaction, so a read-then-write (the audit chain's "read last hash, insert") could race.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets the API read while a worker writes; the busy timeout makes writers queue
        # instead of failing at once; SQLite leaves foreign keys off unless asked.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")
