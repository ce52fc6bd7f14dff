"""End-to-end fixtures: the service as it runs for real, `uisps serve` (uvicorn + a Celery worker
process) on a free port, on embedded defaults or on PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from uisps.client import UispsClient
from uisps.local import LocalService

# One torch thread per process: two oversubscribe a small shared CI machine (OpenMP spins).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
READY_TIMEOUT_S = 120.0


@dataclass
class RunningService:
    client: UispsClient  # an admin key of tenant "default"
    compliance: UispsClient  # a compliance key of the same tenant
    database_url: str
    log: Path
    url: str
    admin_key: str
    compliance_key: str

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
        with UispsClient(local.url) as anonymous:
            try:
                anonymous.wait_ready(READY_TIMEOUT_S, alive=local.alive)
            except Exception:
                pytest.fail(f"the service did not start:\n{log.read_text(errors='replace')[-5000:]}")
        admin_key, compliance_key = local.create_api_key("admin"), local.create_api_key("compliance")
        with UispsClient(local.url, api_key=admin_key) as client, UispsClient(local.url, api_key=compliance_key) as compliance:
            yield RunningService(client, compliance, database_url, log, local.url, admin_key, compliance_key)
