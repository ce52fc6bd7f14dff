"""The model row lock that numbers versions must not block new deletion requests on PostgreSQL:
a finishing job holds it while it takes the tenant's audit lock, which the API holds while it
inserts a request (whose foreign-key check reads the model row); blocking there is a deadlock."""

from __future__ import annotations


from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from core.db import ModelVersion
from core.services.deletion_requests.service import deletion_request_service
from core.services.models.repository import model_repository
from core.services.models.service import ModelSpec, model_service
from core.settings import Settings


def registered_model(sessions: sessionmaker[Session]) -> str:
    with sessions() as session:
        model = model_service.create(session, tenant_id="default", actor="test", spec=ModelSpec(
            name="m", architecture="smallcnn", num_classes=10, input_shape=[1, 8, 8], mean=[0.5], std=[0.5],
            data_source="digits"))
        session.flush()
        session.add(ModelVersion(tenant_id="default", model_id=model.id, version=1, artifact_key="sha256/aa/" + "a" * 64,
                                 sha256="a" * 64, size_bytes=1, parent_version=None, forgotten_labels=[],
                                 deletion_request_id=None, metrics=None))
        session.commit()
        return model.id


def test_a_request_can_be_created_while_a_job_holds_its_model_lock(pg_sessions, tmp_path) -> None:
    model_id = registered_model(pg_sessions)
    with pg_sessions() as job:  # a finishing job, between numbering its version and committing
        assert model_repository.get(job, "default", model_id, for_update=True) is not None
        with pg_sessions() as api:
            api.execute(text("SET LOCAL lock_timeout = '3s'"))  # fails here, instead of waiting, if blocked
            request = deletion_request_service.create(
                api, tenant_id="default", actor="test", settings=Settings(home=tmp_path), model_id=model_id,
                forget_labels=[1], dispatch=lambda _id, _priority: None)
            api.commit()
        job.rollback()
    assert request.state == "queued"
