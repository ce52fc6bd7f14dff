"""PostgreSQL engines replace a pooled connection the server dropped while it sat idle."""

from __future__ import annotations

import time

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from core.db import make_engine
from core.db.session import PING_AFTER_IDLE_S


def test_a_connection_dropped_while_idle_is_replaced_before_use(pg_url: str) -> None:
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    admin = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with engine.connect() as connection:
            backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # The server ends the pooled connection (as a restart or an idle timeout would).
        with psycopg.connect(admin, autocommit=True) as server:
            assert server.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone()[0] is True
        time.sleep(PING_AFTER_IDLE_S + 0.2)

        with engine.connect() as connection:
            answer = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()

        assert answer != backend  # a new connection, and no error for the caller
    finally:
        engine.dispose()
