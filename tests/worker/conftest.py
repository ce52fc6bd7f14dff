"""Worker fixtures: a real database (SQLite or PostgreSQL) and artifact store, configured through
the environment exactly as a worker process reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db.migrate import upgrade
from core.services.deletion_requests.service import deletion_request_service
from core.services.models.service import ModelSpec, model_service
from core.settings import Settings, get_settings
from core.storage import ArtifactStore, make_artifact_store
from uisps.demo import model_spec_of
from uisps.lifeline import tied_to_this_process
from worker.context import sessions_for

ROOT = Path(__file__).resolve().parents[2]

# Enough to exercise every stage of a job in a second or two; forgetting quality is not the point.
TINY_PARAMS: dict[str, Any] = {
    "inversion": {"iterations": 20, "n_per_class": 8},
    "fisher_retain_size": 64,
    "steps": 5,
    "precision": "fp32",
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Jobs run in this process: one torch thread, as two oversubscribe a small shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class WorkerEnv:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore

    def new_model(self, checkpoint: bytes, tenant: str = "default", **spec_changes: Any) -> str:
        """A registered model with `checkpoint` as version 1."""
        spec = {**model_spec_of(checkpoint, f"digits-{uuid.uuid4().hex[:12]}"), **spec_changes}
        with self.sessions() as session:
            model = model_service.create(
                session, tenant_id=tenant, actor="test", spec=ModelSpec(**spec), data_roots=self.settings.data_root_list
            )
            session.commit()
            model_service.upload_version(
                session, tenant_id=tenant, actor="test", model_id=model.id, checkpoint=checkpoint,
                store=self.store, max_bytes=len(checkpoint),
            )
            session.commit()
            return model.id

    def queue(
        self,
        model_id: str,
        labels: list[int],
        params: dict[str, Any] | None = None,
        callback_url: str | None = None,
        *,
        tenant: str = "default",
        base_version: int | None = None,
        dispatch: Callable[[str, int], None] = lambda _id, _priority: None,
    ) -> str:
        """A queued deletion request on `model_id`, handed to `dispatch` once committed (default: not sent)."""
        with self.sessions() as session:
            request = deletion_request_service.create(
                session, tenant_id=tenant, actor="test", settings=self.settings, model_id=model_id,
                forget_labels=labels, base_version=base_version, params=TINY_PARAMS if params is None else params,
                callback_url=callback_url, dispatch=dispatch,
            )
            session.commit()
            return request.id

    def new_request(
        self,
        checkpoint: bytes,
        labels: list[int],
        params: dict[str, Any] | None = None,
        callback_url: str | None = None,
        **spec_changes: Any,
    ) -> str:
        """A registered model with `checkpoint` as version 1 and a queued deletion request (not sent)."""
        return self.queue(self.new_model(checkpoint, **spec_changes), labels, params, callback_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def worker_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerEnv:
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.setenv("UISPS_DATA_ROOTS", str(tmp_path))
    monkeypatch.delenv("UISPS_BROKER_URL", raising=False)
    monkeypatch.delenv("UISPS_ARTIFACT_DIR", raising=False)
    if request.param == "postgresql":
        monkeypatch.setenv("UISPS_DATABASE_URL", request.getfixturevalue("pg_url"))
    else:
        monkeypatch.delenv("UISPS_DATABASE_URL", raising=False)
    settings = get_settings()
    upgrade(settings.effective_database_url)
    return WorkerEnv(settings, sessions_for(settings.effective_database_url), make_artifact_store(settings))


@dataclass
class WorkerProcesses:
    """`python -m worker` processes on a PostgreSQL database of their own and the run's Redis."""

    settings: Settings
    env: dict[str, str]
    log: Path
    started: list[subprocess.Popen]

    def start(self, **env: str) -> subprocess.Popen:
        with self.log.open("ab") as log:
            worker = subprocess.Popen(
                tied_to_this_process([sys.executable, "-m", "worker", "--loglevel=INFO"]), cwd=ROOT, env={**self.env, **env},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.started.append(worker)
        return worker

    def requests(self, settings: Settings | None = None) -> WorkerEnv:
        """Make models and requests in the workers' database (with `settings`, e.g. webhooks on)."""
        settings = settings or self.settings
        return WorkerEnv(settings, sessions_for(settings.effective_database_url), make_artifact_store(settings))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def worker_processes(own_pg_database: str, redis_url: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Start worker processes with `.start(**extra_env)`; each is stopped (SIGTERM, then SIGKILL) at the end.
    Their reconciler runs every second and re-sends queued requests after 3 s."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("UISPS_")},
        "UISPS_HOME": str(tmp_path),
        "UISPS_DATABASE_URL": own_pg_database,
        "UISPS_BROKER_URL": redis_url,
        "UISPS_RECONCILE_INTERVAL_S": "1",
        "UISPS_REQUEUE_AFTER_S": "3",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    upgrade(own_pg_database)
    processes = WorkerProcesses(
        Settings(home=tmp_path, database_url=own_pg_database, broker_url=redis_url), env, tmp_path / "workers.log", []
    )
    try:
        yield processes
    finally:
        for worker in processes.started:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in processes.started:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
