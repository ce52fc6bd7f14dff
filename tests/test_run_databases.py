"""A test run killed before it could drop its databases does not leave them for good."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from run_databases import RunDatabases, create_database, drop_database
from sqlalchemy.engine import make_url


def _admin_dsn(pg_url: str, database: str = "postgres") -> str:
    return make_url(pg_url).set(drivername="postgresql", database=database).render_as_string(hide_password=False)


@pytest.fixture
def admin(pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(_admin_dsn(pg_url), autocommit=True) as connection:
        yield connection


@pytest.fixture
def other_run(pg_url: str) -> Iterator[tuple[RunDatabases, psycopg.Connection]]:
    """Another test run: alive while its connection is open, ended (as if killed) once it closes."""
    connection = psycopg.connect(_admin_dsn(pg_url), autocommit=True)
    yield RunDatabases(connection), connection
    connection.close()


def _exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _drop(admin: psycopg.Connection, *names: str) -> None:
    for name in names:
        drop_database(admin, name)


def test_a_killed_runs_databases_are_dropped_by_the_next_run(admin, other_run) -> None:  # noqa: ANN001
    run, connection = other_run
    names = [create_database(admin, run.name(kind)) for kind in ("test", "own")]
    try:
        connection.close()  # killed: PostgreSQL ends its session and its lock

        dropped = RunDatabases(admin).drop_abandoned()

        assert set(names) <= set(dropped) and not any(_exists(admin, name) for name in names)
    finally:
        _drop(admin, *names)


def test_a_live_runs_databases_are_kept_even_while_nobody_is_connected_to_them(admin, other_run) -> None:  # noqa: ANN001
    run, _ = other_run
    names = [create_database(admin, run.name(kind)) for kind in ("test", "own")]
    try:
        dropped = RunDatabases(admin).drop_abandoned()

        assert all(_exists(admin, name) for name in names) and not set(names) & set(dropped)
    finally:
        _drop(admin, *names)


def test_a_killed_runs_database_a_process_is_still_connected_to_is_kept(admin, other_run, pg_url) -> None:  # noqa: ANN001
    run, connection = other_run
    name = create_database(admin, run.name("own"))
    try:
        connection.close()
        with psycopg.connect(_admin_dsn(pg_url, name)):  # e.g. a worker the killed run started
            assert name not in RunDatabases(admin).drop_abandoned()
            assert _exists(admin, name)
    finally:
        _drop(admin, name)


def test_databases_not_named_as_a_test_runs_are_never_dropped(admin) -> None:  # noqa: ANN001
    # a developer's database, and names from before runs held locks
    names = [create_database(admin, name) for name in ("uisps_test_dev", "uisps_own_1234_abcd1234", "uisps_test_zzzzzzz_ab")]
    try:
        RunDatabases(admin).drop_abandoned()

        assert all(_exists(admin, name) for name in names)
    finally:
        _drop(admin, *names)
