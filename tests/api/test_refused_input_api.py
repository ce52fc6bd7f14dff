"""Client input that PostgreSQL cannot store or compare (a NUL in text, a number or a time beyond a
column) is a 4xx that is the same on SQLite and PostgreSQL, never a 500 from the database."""

from __future__ import annotations

import json

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.app import create_app
from api.deps import SessionDep
from api_helpers import assert_problem, unique_name
from core.db.migrate import upgrade
from core.services.pagination import encode_token
from core.settings import Settings

MISSING = "00000000-0000-0000-0000-000000000000"
NUL_MESSAGE = "String should not contain a NUL character (U+0000)"


def _spec(**fields: Any) -> dict[str, Any]:
    """A model registration that is valid but for `fields`."""
    spec = {
        "name": unique_name(),
        "architecture": "smallcnn",
        "class_names": [str(i) for i in range(10)],
        "input_shape": [1, 8, 8],
        "mean": [0.3],
        "std": [0.4],
        "data_source": "digits",
    }
    return {**spec, **fields}


def _refused_for_nul(response: Any, loc: list[str | int]) -> None:
    problem = assert_problem(response, 422, "validation_error", f"{'.'.join(map(str, loc))}: {NUL_MESSAGE}")
    assert [e["loc"] for e in problem["errors"]] == [loc]


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", "/models/ab%00c", "model_id"),
        ("GET", "/models/ab%00c/versions", "model_id"),
        ("GET", "/deletion-requests/ab%00c", "request_id"),
        ("POST", "/deletion-requests/ab%00c/cancel", "request_id"),
        ("GET", "/api-keys/a%00", "key_id"),
        ("POST", "/api-keys/a%00/revoke", "key_id"),
    ],
)
def test_a_path_id_with_a_nul_is_a_validation_error(client: TestClient, method: str, path: str, param: str) -> None:
    _refused_for_nul(client.request(method, path), ["path", param])


@pytest.mark.parametrize("path", ["/deletion-requests", "/audit-events"])
def test_a_model_id_filter_with_a_nul_is_a_validation_error(client: TestClient, path: str) -> None:
    _refused_for_nul(client.get(path, params={"model_id": "a\x00b"}), ["query", "model_id"])


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/models", _spec(name="a\x00b"), ["body", "name"]),
        ("/models", _spec(architecture="smallcnn\x00"), ["body", "architecture"]),
        ("/models", _spec(class_names=["\x00", *map(str, range(1, 10))]), ["body", "class_names", 0]),
        ("/models", _spec(data_source="digits\x00"), ["body", "data_source"]),
        ("/models", _spec(owner="a\x00b"), ["body", "owner"]),
        ("/deletion-requests", {"model_id": "a\x00b", "forget_labels": [1]}, ["body", "model_id"]),
        ("/deletion-requests", {"model_id": MISSING, "forget_labels": [1], "external_ref": "a\x00b"}, ["body", "external_ref"]),
        ("/deletion-requests", {"model_id": MISSING, "forget_labels": [1], "callback_url": "https://a\x00b"}, ["body", "callback_url"]),
        ("/api-keys", {"role": "reader", "name": "a\x00b"}, ["body", "name"]),
    ],
)
def test_a_body_string_with_a_nul_is_a_validation_error_naming_it(
    client: TestClient, path: str, body: dict[str, Any], loc: list[str | int]
) -> None:
    _refused_for_nul(client.post(path, json=body), loc)


@pytest.mark.parametrize(
    ("path", "filters", "position"),
    [
        ("/models", {}, ["9999-12-31T23:59:59-23:59", MISSING]),  # year 10000 in UTC
        ("/models", {}, ["2026-12-05T12:00:00+00:00", "a\x00b"]),
        ("/deletion-requests", {"model_id": None, "state": None}, ["0001-01-01T00:00:00+23:59", MISSING]),  # year 0
        ("/api-keys", {}, ["2026-12-05T12:00:00+00:00", "a\x00b"]),
        ("/audit-events", {"model_id": None}, [2**63]),  # beyond BIGINT
        ("/audit-events", {"model_id": None}, [10**40]),
    ],
)
def test_a_forged_token_no_row_can_follow_is_400(
    client: TestClient, path: str, filters: dict[str, Any], position: list[Any]
) -> None:
    resource = path.strip("/").replace("-", "_")
    token = encode_token(position, {"resource": resource, "tenant": "default", **filters})
    response = client.get(path, params={"page_token": token})
    assert_problem(response, 400, "invalid_page_token", "not a token this service issued")


def test_a_token_longer_than_any_issued_is_400_as_any_other_bad_token(client: TestClient) -> None:
    response = client.get("/models", params={"page_token": "x" * 1001})

    assert_problem(response, 400, "invalid_page_token", "not a token this service issued")


def test_a_forged_version_token_beyond_integer_is_400(client: TestClient) -> None:
    model = client.post("/models", json=_spec())
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    token = encode_token([2**40], {"resource": "model_versions", "tenant": "default", "model_id": model_id})

    response = client.get(f"/models/{model_id}/versions", params={"page_token": token})

    assert_problem(response, 400, "invalid_page_token", "not a token this service issued")


@pytest.fixture
def pg_client(pg_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The app on PostgreSQL, which refuses values SQLite stores."""
    upgrade(pg_url)
    with TestClient(create_app(Settings(home=tmp_path, database_url=pg_url))) as test_client:
        yield test_client


def test_a_value_the_database_refuses_is_400_not_500(pg_client: TestClient) -> None:
    # Stands for a check the service lacks: a client's value that reaches a query unchecked.
    def unchecked(session: SessionDep) -> None:
        session.execute(text("SELECT CAST(:value AS text)"), {"value": "a\x00b"})

    pg_client.app.add_api_route("/unchecked", unchecked)

    response = pg_client.get("/unchecked")

    problem = assert_problem(response, 400, "invalid_value", "cannot store or compare")
    assert "a\x00b" not in problem["detail"] and "SELECT" not in problem["detail"]


@pytest.mark.parametrize("params", [{"alpha": 1e999}, {"lr": float("nan")}, {"inversion": {"lr": -1e999}}])
def test_a_non_finite_parameter_is_a_validation_error(
    client: TestClient, registered_model: Any, params: dict[str, Any]
) -> None:
    # Python's JSON reads 1e999 as inf: pydantic took it, and the audit log (SQLite) then 500-ed.
    body = json.dumps({"model_id": registered_model()["id"], "forget_labels": [1], "params": params})
    response = client.post("/deletion-requests", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert "finite" in response.text


@pytest.mark.parametrize("params", [{"synthetic_per_batch": 16, "batch_size": 16}, {"batch_size": 8}])
def test_a_batch_with_no_room_for_retained_samples_is_a_validation_error(
    client: TestClient, registered_model: Any, params: dict[str, Any]
) -> None:
    # batch_size 8 with the default 16 synthetic samples per batch: the pass would have put nearly
    # all of D_r into its first batch and trained on D'_g alone after it.
    body = {"model_id": registered_model()["id"], "forget_labels": [1], "params": params}

    assert_problem(client.post("/deletion-requests", json=body), 422, "validation_error", "must be below batch_size")
