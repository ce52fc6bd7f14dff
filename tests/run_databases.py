"""Names of a test run's PostgreSQL databases, and the sweep of those a killed run left behind."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket

import psycopg
from psycopg import sql

# A run's databases are named for its host and pid, so that a later run on the same host can drop
# the ones a killed run left behind, and never touches another host's (a shared server).
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def run_database_name(kind: str, pid: int | None = None) -> str:
    return f"uisps_{kind}_{_HOST_TAG}_{os.getpid() if pid is None else pid}_{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def drop_abandoned_test_databases(admin: psycopg.Connection) -> list[str]:
    """Drops this host's test databases whose run has ended without dropping them (killed), and
    returns their names. One still connected to is kept: PostgreSQL refuses to drop it."""
    pattern = rf"^uisps_(test|own)_{_HOST_TAG}_[0-9]+_[0-9a-f]+$"
    names = [row[0] for row in admin.execute("SELECT datname FROM pg_database WHERE datname ~ %s", (pattern,))]
    dropped = []
    for name in names:
        if _pid_alive(int(name.split("_")[3])):
            continue
        try:
            admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        except (psycopg.errors.ObjectInUse, psycopg.errors.InvalidCatalogName):
            continue  # someone is connected, or a run beside this one dropped it first
        dropped.append(name)
    return dropped
