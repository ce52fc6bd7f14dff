"""Alembic environment: runs the service's migrations against one database.

The URL is taken, in order, from a connection handed over in ``config.attributes["connection"]``,
the ``sqlalchemy.url`` main option (``core.db.migrate`` sets it), or the service settings.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, pool

from core.db.base import Base, UTCDateTime
from core.db.migrate import MIGRATION_LOCK_ID
from core.db.session import make_engine
from core.settings import get_settings

import core.db.tables  # noqa: F401  (registers the tables on Base.metadata)

config = context.config

# Only configure logging when run from an ini file; programmatic runs (tests, `uisps db`) keep
# the host's logging untouched.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().effective_database_url


def render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | Literal[False]:
    # UTCDateTime only converts values in Python; migrations must not import application code.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on_connection(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=is_sqlite,
        # core.db.session makes SQLite's driver emit a real BEGIN, so a migration that fails
        # halfway rolls back on SQLite too (Alembic assumes it cannot).
        transactional_ddl=True if is_sqlite else None,
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two upgrades at once (a migrate job and an API starting, two deploys) would both
            # read the old revision and both apply it: the second fails half-way. The lock,
            # held to the end of the transaction, makes the second wait and then find the head.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        context.run_migrations()
        if is_sqlite:
            _check_sqlite_foreign_keys(connection)


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    # Foreign keys are off during SQLite migrations (see below), so check them before commit.
    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise RuntimeError(f"migration left dangling foreign keys: {problems[:5]}")


def run_migrations_online() -> None:
    handed_over = config.attributes.get("connection")
    if handed_over is not None:
        run_on_connection(handed_over)
        return
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # Batch mode drops and re-creates tables; with foreign keys on, dropping a
                # referenced table fails. The pragma is ignored inside a transaction, so it goes
                # to the driver before SQLAlchemy begins one.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            run_on_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
