"""Liveness, readiness, and 503 (never 500) when the database or broker cannot be reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy.engine import make_url

from api.app import create_app
from api_helpers import assert_problem, authorize, unique_name
from core.settings import Settings


def test_healthz_and_readyz_when_all_is_well(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "artifact_store": "ok"}}


def test_openapi_documents_the_resources_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    assert {"/models", "/deletion-requests", "/deletion-requests/{request_id}/cancel", "/audit-events"} <= spec["paths"].keys()
    schemas = spec["components"]["schemas"]
    assert schemas["ModelCreate"]["examples"] and schemas["DeletionRequestCreate"]["examples"]
    post = spec["paths"]["/deletion-requests"]["post"]
    assert "application/problem+json" in post["responses"]["422"]["content"]


def test_an_unreachable_broker_makes_readyz_503_but_requests_are_still_recorded(
    tmp_path: Path, model_spec: dict[str, Any], digits_checkpoint: bytes
) -> None:
    # Nothing listens on port 9: publishing fails, the committed request stays queued for the
    # worker's start-up sweep to send.
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:9/0")
    with TestClient(create_app(settings)) as client:
        authorize(client)
        problem = assert_problem(client.get("/readyz"), 503, "not_ready", "failing: broker")
        assert problem["checks"]["database"] == "ok"
        model = client.post("/models", json=model_spec).json()
        client.post(f"/models/{model['id']}/versions", files={"file": ("m.safetensors", digits_checkpoint)})

        response = client.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [1]})

        assert response.status_code == 202
        assert client.get(response.headers["location"]).json()["state"] == "queued"


@pytest.mark.parametrize("store", ["a file where the folder should be", "an S3 endpoint nobody serves"])
def test_a_store_that_cannot_take_a_write_makes_readyz_degraded(tmp_path: Path, store: str) -> None:
    if store.startswith("a file"):
        (tmp_path / "artifacts").write_text("not a folder")
        settings = Settings(home=tmp_path, artifact_dir=tmp_path / "artifacts")
    else:
        settings = Settings(home=tmp_path, artifact_backend="s3", s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")  # still serving reads: an orchestrator keeps it in service

        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        checks = ready.json()["checks"]
        assert checks["database"] == checks["broker"] == "ok" and checks["artifact_store"].startswith("error: ")


@pytest.fixture
def doomed_database(pg_url: str) -> Iterator[tuple[str, "psycopg.Connection"]]:
    """A PostgreSQL database of its own, which the test drops while the app is using it."""
    admin_url = make_url(pg_url).set(drivername="postgresql", database="postgres")
    admin = psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True)
    name = f"uisps_doomed_{unique_name('db').replace('-', '_')}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False), admin
    finally:
        _drop(admin, name)
        admin.close()


def _drop(admin: psycopg.Connection, name: str) -> None:
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_an_unreachable_database_is_503_problem_never_500(tmp_path: Path, doomed_database) -> None:  # noqa: ANN001
    url, admin = doomed_database
    with TestClient(create_app(Settings(home=tmp_path, database_url=url)), raise_server_exceptions=False) as client:
        authorize(client)
        assert client.get("/models").status_code == 200

        _drop(admin, make_url(url).database)

        for response in (
            client.get("/models"),
            client.post("/deletion-requests", json={"model_id": "m", "forget_labels": [1]}),
            client.get("/audit-events"),
        ):
            problem = assert_problem(response, 503, "database_unavailable", "retry")
            assert response.headers["retry-after"]
            assert problem["title"] == "Service Unavailable"
        problem = assert_problem(client.get("/readyz"), 503, "not_ready", "database")
        assert problem["checks"]["broker"] == "ok"
        assert client.get("/healthz").status_code == 200
