"""Following a deletion request over HTTP while a real Celery worker process runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.db import DEFAULT_TENANT, utcnow
from core.services.deletion_requests.service import deletion_request_service
from core.settings import Settings
from uisps.demo import FAST_PARAMS, model_spec_of
from uisps.lifeline import tied_to_this_process
from uisps.local import service_env, stop_process

from api_helpers import SINGLE_THREAD_ENV, authorize, unique_name

TERMINAL = ("succeeded", "failed", "cancelled")
TINY_PARAMS = {"inversion": {"iterations": 20, "n_per_class": 8}, "fisher_retain_size": 64, "steps": 5, "precision": "fp32"}


@dataclass
class Harness:
    client: TestClient
    lost_request_id: str  # queued before the worker started, its message never sent


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, digits_checkpoint: bytes) -> Iterator[Harness]:
    """The app on embedded defaults in a temp UISPS_HOME, and `python -m worker` on the same home."""
    home = tmp_path_factory.mktemp("uisps-home")
    # Polled every 50 ms, faster than the rate limit allows a real client: the limit is off here.
    with TestClient(create_app(Settings(home=home, rate_limit_per_s=0, tenant_rate_limit_per_s=0))) as client:  # start-up migrates the database
        authorize(client)
        lost_request_id = _lost_request(client, _register(client, digits_checkpoint))
        with (home / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                tied_to_this_process([sys.executable, "-m", "worker", "--loglevel=INFO"]),
                # no periodic pass within the tests: only the start-up sweep can send the lost request
                env=service_env(home, {**SINGLE_THREAD_ENV, "UISPS_RECONCILE_INTERVAL_S": "3600"}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                yield Harness(client, lost_request_id)
            finally:
                stop_process(worker, grace_s=30)


def _poll(client: TestClient, request_id: str, until: Any, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Every distinct (state, stage, progress) seen until `until(request)` holds."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        request = client.get(f"/deletion-requests/{request_id}").json()
        key = (request["state"], request["stage"], request["progress"])
        if not seen or key != (seen[-1]["state"], seen[-1]["stage"], seen[-1]["progress"]):
            seen.append(request)
        if until(request):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; last seen {seen[-1]}")


def _register(client: TestClient, checkpoint: bytes) -> str:
    model_id = client.post("/models", json=model_spec_of(checkpoint, unique_name())).json()["id"]
    files = {"file": ("m.safetensors", checkpoint, "application/octet-stream")}
    assert client.post(f"/models/{model_id}/versions", files=files).status_code == 201
    return model_id


def _lost_request(client: TestClient, model_id: str) -> str:
    """A request committed (and sent) an hour ago whose message never reached the broker."""
    app = client.app
    with app.state.sessions() as session:
        request = deletion_request_service.create(
            session, tenant_id=DEFAULT_TENANT, actor="test", settings=app.state.settings, model_id=model_id,
            forget_labels=[1], params=TINY_PARAMS, dispatch=lambda _id, _priority: None,
        )
        request.created_at = request.dispatched_at = utcnow() - timedelta(hours=1)
        session.commit()
        return request.id


def test_polling_shows_stage_and_progress_moving_until_done(harness: Harness, digits_checkpoint: bytes) -> None:
    client = harness.client
    model_id = _register(client, digits_checkpoint)
    request_id = client.post(
        "/deletion-requests", json={"model_id": model_id, "forget_labels": [3], "params": FAST_PARAMS}
    ).json()["id"]

    seen = _poll(client, request_id, lambda r: r["state"] in TERMINAL)

    final = seen[-1]
    assert final["state"] == "succeeded", final["error"]
    running = [r for r in seen if r["state"] == "running"]
    assert len({r["progress"] for r in running}) >= 2
    assert {"inversion", "unlearning"} & {r["stage"] for r in running}
    progress = [r["progress"] for r in seen]
    assert progress == sorted(progress) and final["progress"] == 1.0
    assert final["started_at"] and final["finished_at"] and final["attempts"] == 1
    assert final["result_version"] == 2 and final["metrics"]["after"]["acc_forget"] <= 1.0
    version = client.get(f"/models/{model_id}/versions/2").json()
    assert version["deletion_request_id"] == request_id
    assert version["parent_version"] == 1 and version["forgotten_labels"] == [3]
    actions = [e["action"] for e in client.get("/audit-events", params={"model_id": model_id}).json()["audit_events"]]
    assert actions[-4:] == [
        "deletion_request.created", "deletion_request.running", "model_version.created", "deletion_request.succeeded"
    ]


def test_cancelling_a_running_request_stops_the_worker(harness: Harness, digits_checkpoint: bytes) -> None:
    client = harness.client
    model_id = _register(client, digits_checkpoint)
    slow = {**FAST_PARAMS, "inversion": {"iterations": 100_000}}  # would run for many minutes
    request_id = client.post(
        "/deletion-requests", json={"model_id": model_id, "forget_labels": [4], "params": slow}
    ).json()["id"]
    _poll(client, request_id, lambda r: r["stage"] == "inversion")

    response = client.post(f"/deletion-requests/{request_id}/cancel")

    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    final = _poll(client, request_id, lambda r: r["state"] in TERMINAL, timeout_s=60)[-1]
    assert final["state"] == "cancelled" and final["result_version"] is None
    assert [v["version"] for v in client.get(f"/models/{model_id}/versions").json()["versions"]] == [1]
    actions = [e["action"] for e in client.get("/audit-events", params={"model_id": model_id}).json()["audit_events"]]
    assert actions[-2:] == ["deletion_request.cancel_requested", "deletion_request.cancelled"]


def test_a_request_whose_message_was_lost_runs_when_a_worker_starts(harness: Harness) -> None:
    # The worker's start-up sweep re-sends queued requests that have waited too long.
    final = _poll(harness.client, harness.lost_request_id, lambda r: r["state"] in TERMINAL)[-1]

    assert final["state"] == "succeeded" and final["result_version"] == 2
