"""A test run's PostgreSQL databases, and the sweep of those a killed run left behind.

Each run holds a PostgreSQL advisory lock, named by its run id, for as long as it lives, and names
its databases with that id. PostgreSQL releases the lock when the run's connection ends, however
the run ended, so a later run (from any host or container) knows a database's run is gone when it
can take that lock. Pids would not do: a container sharing the host's name and network has pids
of its own.
"""

from __future__ import annotations

import re
import secrets
import warnings

import psycopg
from psycopg import sql

_LOCK_CLASS = 0x5553  # the first key of this project's test-run locks
_NAME = re.compile(r"^uisps_(?:test|own)_([0-9a-f]{7})_[0-9a-f]+$")


class RunDatabases:
    """This run's claim on the databases it creates; `admin` must stay open while the run lives."""

    def __init__(self, admin: psycopg.Connection) -> None:
        self.run_id = secrets.token_hex(4)[:7]  # 28 bits: fits the lock's int4 key
        self._admin = admin
        admin.execute("SELECT pg_advisory_lock(%s, %s)", (_LOCK_CLASS, int(self.run_id, 16)))

    def name(self, kind: str) -> str:
        return f"uisps_{kind}_{self.run_id}_{secrets.token_hex(4)}"

    def drop_abandoned(self) -> list[str]:
        """Drops the test databases of runs that have ended without dropping them (killed), and
        returns their names. Best effort: what cannot be dropped now is left for a later run."""
        dropped = []
        try:
            # only databases this role may drop: another user's leftovers are theirs to sweep
            names = [row[0] for row in self._admin.execute(
                "SELECT datname FROM pg_database WHERE pg_has_role(datdba, 'MEMBER')")]
            runs: dict[str, list[str]] = {}
            for name in names:
                if (match := _NAME.match(name)) and match[1] != self.run_id:
                    runs.setdefault(match[1], []).append(name)
            for run_id, databases in runs.items():
                dropped += self._drop_if_ended(run_id, databases)
        except psycopg.Error as error:
            warnings.warn(f"could not sweep the test databases of killed runs: {error}", stacklevel=2)
        return dropped

    def _drop_if_ended(self, run_id: str, databases: list[str]) -> list[str]:
        key = (_LOCK_CLASS, int(run_id, 16))
        if not self._admin.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]:
            return []  # that run is alive
        dropped = []
        try:
            for name in databases:
                try:
                    self._admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
                except (psycopg.errors.ObjectInUse, psycopg.errors.InvalidCatalogName):
                    continue  # a process of that run still connected, or a run beside this one dropped it
                dropped.append(name)
        finally:
            self._admin.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        return dropped


def create_database(admin: psycopg.Connection, name: str) -> str:
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin: psycopg.Connection, name: str) -> None:
    """Drops it, ending its sessions first: a leaked pooled connection would otherwise block it."""
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                  (name,))
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
