"""API fixtures: the FastAPI app on a real database (SQLite in a temp UISPS_HOME, or PostgreSQL)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Starlette suggests httpx2 for its TestClient; httpx is what this project ships with.
warnings.filterwarnings("ignore", message=".*starlette.testclient.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*httpx2.*")

from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from core.db.migrate import upgrade  # noqa: E402
from core.settings import Settings  # noqa: E402
from uisps.demo import model_spec_of  # noqa: E402

from api_helpers import authorize, unique_name  # noqa: E402

ModelFactory = Callable[..., dict[str, Any]]


def make_settings(home: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    return Settings(home=home, database_url=database_url, **overrides)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Embedded defaults in a temp UISPS_HOME, or the same with the database on PostgreSQL."""
    if request.param == "sqlite":
        return make_settings(tmp_path)
    pg_url: str = request.getfixturevalue("pg_url")
    upgrade(pg_url)  # tests/core/db may have left it downgraded
    return make_settings(tmp_path, pg_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The app, with keys of tenant "default": each request carries the role that fits it."""
    with TestClient(create_app(settings)) as test_client:
        authorize(test_client)
        yield test_client


@pytest.fixture
def model_spec(digits_checkpoint: bytes) -> dict[str, Any]:
    return model_spec_of(digits_checkpoint, unique_name())


@pytest.fixture
def registered_model(client: TestClient, digits_checkpoint: bytes) -> ModelFactory:
    """Register a digits model (unique name) and upload the checkpoint as version 1."""

    def register(upload: bool = True) -> dict[str, Any]:
        response = client.post("/models", json=model_spec_of(digits_checkpoint, unique_name()))
        assert response.status_code == 201, response.text
        model = response.json()
        if upload:
            files = {"file": ("m.safetensors", digits_checkpoint, "application/octet-stream")}
            uploaded = client.post(f"/models/{model['id']}/versions", files=files)
            assert uploaded.status_code == 201, uploaded.text
        return model

    return register
