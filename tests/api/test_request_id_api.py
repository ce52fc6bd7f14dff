"""X-Request-ID: accepted from the client when sane, else generated; echoed; in the JSON logs."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.logs import deletion_request_context, make_handler
from core.services.models.service import model_service


@pytest.fixture
def json_logs(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """What the service's JSON handler writes, attached to the root logger at INFO."""
    stream = io.StringIO()
    handler = make_handler("json", stream=stream)
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_client_request_id_round_trips_and_is_in_the_json_log(
    client: TestClient, json_logs: io.StringIO
) -> None:
    response = client.get("/models", headers={"X-Request-ID": "req-4f2a.9:b"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "req-4f2a.9:b"
    access = [r for r in records(json_logs) if r["logger"] == "uisps.access" and r["request_id"] == "req-4f2a.9:b"]
    assert len(access) == 1, records(json_logs)
    line = access[0]
    assert {"timestamp", "level", "logger", "message", "request_id"} <= line.keys()
    assert line["level"] == "INFO" and line["route"] == "/models" and line["status"] == 200
    assert line["message"].startswith("GET /models 200")
    # the fields log queries filter on, as docs/service.md names them
    assert line["method"] == "GET" and line["path"] == "/models" and isinstance(line["duration_ms"], float)


@pytest.mark.parametrize("offered", [None, "", "has space", "x" * 300, "é".encode(), "-leading-dash", "a\"b"])
def test_a_missing_or_odd_request_id_is_replaced(client: TestClient, offered: str | bytes | None) -> None:
    headers = {} if offered is None else {"X-Request-ID": offered}
    response = client.get("/healthz", headers=headers)
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert client.get("/healthz", headers=headers).headers["X-Request-ID"] != generated


def test_an_unexpected_error_is_a_500_with_its_request_id_in_the_response_and_the_log(
    client: TestClient, json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(model_service, "list", broken)
    response = client.get("/models", headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500 and response.headers["X-Request-ID"] == "trace-500"
    assert response.json()["type"].endswith(":internal_error")
    errors = [r for r in records(json_logs) if r["level"] == "ERROR"]
    assert errors and {r["request_id"] for r in errors} == {"trace-500"}, errors
    assert errors[0]["message"] == "unhandled error on GET /models"


def test_a_refused_request_has_a_request_id_too(client: TestClient) -> None:
    response = client.get("/models", auth=None)
    assert response.status_code == 401
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_job_log_lines_carry_the_deletion_request_id(json_logs: io.StringIO) -> None:
    log = logging.getLogger("worker.jobs")
    with deletion_request_context("dr-123"):
        log.info("working")
    log.info("idle")
    working, idle = (r for r in records(json_logs) if r["logger"] == "worker.jobs")
    assert working["deletion_request_id"] == "dr-123" and working["message"] == "working"
    assert working["request_id"] is None
    assert "deletion_request_id" not in idle
