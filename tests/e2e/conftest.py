"""End-to-end fixtures: the service as it runs for real, `uisps serve` (uvicorn + a Celery worker
process) on a free port, on embedded defaults or on PostgreSQL + Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from uisps.client import UispsClient
from uisps.demo import train_digits_checkpoint
from uisps.local import LocalService

# One torch thread per process: two oversubscribe a small shared CI machine (OpenMP spins).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
READY_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    cached = tmp_path_factory.getbasetemp() / "digits-smallcnn.safetensors"
    if not cached.exists():
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cached.write_bytes(train_digits_checkpoint())
        finally:
            torch.set_num_threads(before)
    return cached.read_bytes()


@pytest.fixture
def own_pg_database(pg_url: str) -> Iterator[str]:
    """A PostgreSQL database for one test, on pg_url's server, dropped afterwards.

    Not pg_url itself: the worker's start-up sweep re-sends every queued request it finds, and the
    shared database holds requests other tests queued on purpose without a worker.
    """
    admin_url = make_url(pg_url).set(drivername="postgresql", database="postgres")
    name = f"uisps_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@dataclass
class RunningService:
    client: UispsClient
    database_url: str
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(params=["embedded", "postgresql+redis"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningService]:
    home = tmp_path / "home"
    env = dict(SINGLE_THREAD_ENV)
    database_url = f"sqlite:///{home / 'uisps.db'}"
    if request.param == "postgresql+redis":
        database_url = request.getfixturevalue("own_pg_database")
        env |= {"UISPS_DATABASE_URL": database_url, "UISPS_BROKER_URL": request.getfixturevalue("redis_url")}
    log = tmp_path / "server.log"
    with log.open("wb") as log_file, LocalService(home, env=env, log=log_file) as local:
        with UispsClient(local.url) as client:
            running = RunningService(client, database_url, log)
            try:
                client.wait_ready(READY_TIMEOUT_S, alive=local.alive)
            except Exception:
                pytest.fail(f"the service did not start:\n{running.log_tail()}")
            yield running
