"""Schemathesis over the whole OpenAPI document, with valid keys: no response is a 5xx, and every
response (status, content type, headers, body) is one the document describes.

Bounded (a few examples per operation, no shrinking) so it stays well under a minute.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api_helpers import TenantKeys, make_keys, role_for
from core.db import make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.services.deletion_requests.jobs import deletion_jobs
from core.services.deletion_requests.service import deletion_request_service
from core.services.models.service import ModelSpec, model_service
from core.settings import Settings
from core.storage import StoredArtifact, make_artifact_store
from uisps.demo import model_spec_of

# A deeper run: UISPS_SCHEMATHESIS_EXAMPLES=500 (random rather than the fixed CI sequence).
EXAMPLES_PER_OPERATION = int(os.environ.get("UISPS_SCHEMATHESIS_EXAMPLES", "12"))
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)


# Module level, as schemathesis parametrizes at collection (its from_fixture breaks on pytest 9).
HOME = Path(tempfile.mkdtemp(prefix="uisps-schemathesis-"))
atexit.register(shutil.rmtree, HOME, ignore_errors=True)  # also when the module is only collected
SERVICE_SETTINGS = Settings(home=HOME, rate_limit_per_s=0, tenant_rate_limit_per_s=0)  # thousands of calls, on purpose
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SERVICE_SETTINGS))


@dataclass(frozen=True)
class Seeded:
    keys: TenantKeys
    model_id: str
    request_id: str  # a succeeded request (it has a certificate)


@pytest.fixture(scope="module")
def seeded(digits_checkpoint: bytes) -> Iterator[Seeded]:
    """Keys, a model with version 1, a succeeded request: half of the cases use these real ids,
    so generated data reaches past the 404s (label checks, uploads, downloads, certificates)."""
    url = SERVICE_SETTINGS.effective_database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        keys = make_keys(sessions)
        with sessions() as session:
            spec = ModelSpec(**model_spec_of(digits_checkpoint, "seeded"))
            model = model_service.create(session, tenant_id="default", actor="test", spec=spec)
            session.commit()
            model_service.upload_version(
                session, tenant_id="default", actor="test", model_id=model.id, checkpoint=digits_checkpoint,
                store=make_artifact_store(SERVICE_SETTINGS), max_bytes=len(digits_checkpoint),
            )
            request = deletion_request_service.create(
                session, tenant_id="default", actor="test", settings=SERVICE_SETTINGS, model_id=model.id,
                forget_labels=[1], dispatch=lambda _id, _priority: None,
            )
            session.commit()
            model_id, request_id = model.id, request.id
        with sessions.begin() as session:
            job = deletion_jobs.claim(session, request_id, lease_s=60).job
            artifact = StoredArtifact(job.base.artifact_key, job.base.sha256, job.base.size_bytes)
            deletion_jobs.complete(session, request_id, artifact=artifact, forgotten_labels=[1], metrics={})
        yield Seeded(keys, model_id, request_id)
    finally:
        engine.dispose()


_cases = itertools.count()


def _use_real_ids(case: Any, seeded: Seeded) -> None:
    if next(_cases) % 2:
        return
    real = {"model_id": seeded.model_id, "request_id": seeded.request_id}
    for name in set(real) & set(case.path_parameters or {}):
        case.path_parameters[name] = real[name]
    if "version" in (case.path_parameters or {}):
        case.path_parameters["version"] = 1
    if isinstance(case.body, dict) and "model_id" in case.body:
        case.body["model_id"] = seeded.model_id


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize="UISPS_SCHEMATHESIS_EXAMPLES" not in os.environ,
)
def test_every_operation_conforms_and_never_fails(case: Any, seeded: Seeded) -> None:
    _use_real_ids(case, seeded)
    role = role_for(case.method.upper(), case.formatted_path)
    case.call_and_validate(headers=seeded.keys.header(role), checks=CHECKS)
