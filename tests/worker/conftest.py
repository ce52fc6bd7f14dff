"""Worker fixtures: a real database (SQLite or PostgreSQL) and artifact store, configured through
the environment exactly as a worker process reads it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
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
from uisps.demo import model_spec_of, train_digits_checkpoint
from worker.context import sessions_for

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


@dataclass
class WorkerEnv:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore

    def new_request(
        self, checkpoint: bytes, labels: list[int], params: dict[str, Any] | None = None, **spec_changes: Any
    ) -> str:
        """A registered model with `checkpoint` as version 1 and a queued deletion request (not sent)."""
        spec = {**model_spec_of(checkpoint, f"digits-{uuid.uuid4().hex[:12]}"), **spec_changes}
        with self.sessions() as session:
            model = model_service.create(session, tenant_id="default", actor="test", spec=ModelSpec(**spec))
            session.commit()
            model_service.upload_version(
                session, tenant_id="default", actor="test", model_id=model.id, checkpoint=checkpoint,
                store=self.store, max_bytes=len(checkpoint),
            )
            request = deletion_request_service.create(
                session, tenant_id="default", actor="test", settings=self.settings, model_id=model.id,
                forget_labels=labels, params=TINY_PARAMS if params is None else params, dispatch=lambda _id: None,
            )
            session.commit()
            return request.id


@pytest.fixture(params=["sqlite", "postgresql"])
def worker_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerEnv:
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.delenv("UISPS_BROKER_URL", raising=False)
    monkeypatch.delenv("UISPS_ARTIFACT_DIR", raising=False)
    if request.param == "postgresql":
        monkeypatch.setenv("UISPS_DATABASE_URL", request.getfixturevalue("pg_url"))
    else:
        monkeypatch.delenv("UISPS_DATABASE_URL", raising=False)
    settings = get_settings()
    upgrade(settings.effective_database_url)
    return WorkerEnv(settings, sessions_for(settings.effective_database_url), make_artifact_store(settings))
