"""A test run killed before it could drop its databases does not leave them for good."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from run_databases import drop_abandoned_test_databases, run_database_name
from sqlalchemy.engine import make_url


@pytest.fixture
def admin(pg_url: str) -> Iterator[psycopg.Connection]:
    url = make_url(pg_url).set(drivername="postgresql", database="postgres")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as connection:
        yield connection


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _create(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _drop(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_killed_runs_databases_are_dropped_and_a_live_runs_kept(admin: psycopg.Connection) -> None:
    abandoned = [run_database_name(kind, pid=_ended_pid()) for kind in ("test", "own")]
    live = run_database_name("own")
    for name in (*abandoned, live):
        _create(admin, name)
    try:
        dropped = drop_abandoned_test_databases(admin)
        assert set(abandoned) <= set(dropped)
        assert not any(_exists(admin, name) for name in abandoned)
        assert _exists(admin, live) and live not in dropped
    finally:
        for name in (*abandoned, live):
            _drop(admin, name)


def test_an_abandoned_database_someone_is_connected_to_is_kept(
        admin: psycopg.Connection, pg_url: str) -> None:
    name = run_database_name("own", pid=_ended_pid())
    _create(admin, name)
    url = make_url(pg_url).set(drivername="postgresql", database=name)
    try:
        with psycopg.connect(url.render_as_string(hide_password=False)):
            assert name not in drop_abandoned_test_databases(admin)
            assert _exists(admin, name)
    finally:
        _drop(admin, name)


def test_other_databases_on_the_server_are_never_dropped(admin: psycopg.Connection) -> None:
    # another host's run, and a developer's database that merely looks like a test run's
    others = [f"uisps_test_00000000_{_ended_pid()}_abcd1234", f"uisps_own_{_ended_pid()}_abcd1234"]
    for name in others:
        _create(admin, name)
    try:
        drop_abandoned_test_databases(admin)
        assert all(_exists(admin, name) for name in others)
    finally:
        for name in others:
            _drop(admin, name)
