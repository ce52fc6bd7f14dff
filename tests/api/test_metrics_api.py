"""GET /metrics: Prometheus text, deletion requests by state from the database, HTTP counters."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from api.app import create_app
from core.db import DeletionRequest, Model, utcnow
from core.settings import Settings
from uisps.lifeline import tied_to_this_process
from uisps.local import stop_process

from api_helpers import authorize, unique_name

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@pytest.fixture
def metrics_client(settings: Settings) -> Iterator[TestClient]:
    # Stage timings averaged over the two most recent succeeded jobs: the ones this test makes.
    with TestClient(create_app(settings.model_copy(update={"metrics_recent_jobs": 2}))) as test_client:
        authorize(test_client)
        yield test_client


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics", auth=None)  # no API key: like /healthz
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def by_state(samples: Samples) -> dict[str, float]:
    return {state: samples[("uisps_deletion_requests", (("state", state),))] for state in STATES}


def test_metrics_count_deletion_requests_by_state_across_tenants(metrics_client: TestClient) -> None:
    sessions = metrics_client.app.state.sessions
    before = scrape(metrics_client)  # the PostgreSQL database is shared by the run: compare deltas
    assert before[("uisps_metrics_database_up", ())] == 1
    tenant = unique_name("metrics-tenant")
    model_id = str(uuid.uuid4())
    wanted = {"queued": 3, "running": 1, "succeeded": 2, "failed": 1, "cancelled": 0}
    later = utcnow() + timedelta(days=1)  # the most recently finished: the ones averaged
    timings = [{"inversion": 2.0, "fisher": 1.0}, {"inversion": 4.0, "fisher": 3.0, "unlearning": 5.0}]
    try:
        with sessions.begin() as session:
            session.add(Model(id=model_id, tenant_id=tenant, name=unique_name(), architecture="smallcnn",
                              num_classes=10, input_shape=[1, 8, 8], mean=[0.0], std=[1.0], data_source="digits"))
            session.flush()
            for state, count in wanted.items():
                for i in range(count):
                    report: dict[str, Any] | None = None
                    if state == "succeeded":
                        report = {"timings": timings[i]}
                    session.add(DeletionRequest(
                        tenant_id=tenant, model_id=model_id, forget_labels=[3], base_version=1, params={},
                        state=state, metrics=report, finished_at=later + timedelta(seconds=i) if report else None,
                    ))
        after = scrape(metrics_client)
        counts_before, counts_after = by_state(before), by_state(after)
        assert {state: counts_after[state] - counts_before[state] for state in STATES} == wanted
        assert after[("uisps_queue_depth", ())] - before[("uisps_queue_depth", ())] == 3
        assert after[("uisps_job_failures_total", ())] - before[("uisps_job_failures_total", ())] == 1
        assert after[("uisps_job_stage_seconds_mean", (("stage", "inversion"),))] == 3.0
        assert after[("uisps_job_stage_seconds_mean", (("stage", "fisher"),))] == 2.0
        assert after[("uisps_job_stage_seconds_mean", (("stage", "unlearning"),))] == 5.0
        assert after[("uisps_job_stage_seconds_samples", ())] == 2
        # An operator's view: no tenant (nor any id) in a label.
        text = metrics_client.get("/metrics", auth=None).text
        assert tenant not in text and model_id not in text
    finally:
        with sessions.begin() as session:  # queued rows must not reach a later test's worker
            session.execute(delete(DeletionRequest).where(DeletionRequest.tenant_id == tenant))
            session.execute(delete(Model).where(Model.tenant_id == tenant))


def test_http_requests_are_counted_by_route_template_and_status(metrics_client: TestClient) -> None:
    for _ in range(2):
        assert metrics_client.get("/healthz").status_code == 200
    assert metrics_client.get(f"/models/{uuid.uuid4()}").status_code == 404
    assert metrics_client.get("/no/such/path").status_code == 404
    assert metrics_client.head("/healthz").status_code == 200  # served as a GET, counted as a HEAD
    samples = scrape(metrics_client)

    def labels(route: str, status: str, method: str = "GET") -> tuple[tuple[str, str], ...]:
        return (("method", method), ("route", route), ("status", status))

    assert samples[("uisps_http_requests_total", labels("/healthz", "200"))] == 2
    assert samples[("uisps_http_request_duration_seconds_count", labels("/healthz", "200"))] == 2
    assert samples[("uisps_http_request_duration_seconds_sum", labels("/healthz", "200"))] > 0
    assert samples[("uisps_http_requests_total", labels("/models/{model_id}", "404"))] == 1
    assert samples[("uisps_http_requests_total", labels("unmatched", "404"))] == 1
    assert samples[("uisps_http_requests_total", labels("/healthz", "200", "HEAD"))] == 1
    assert not any("/no/such/path" in value for _, key in samples for _, value in key)


def test_a_method_of_the_clients_own_making_is_counted_as_other(metrics_client: TestClient) -> None:
    # Else every made-up method would add series, from clients without a key.
    for method in ("PROBE1", "PROBE2"):
        metrics_client.request(method, "/healthz")
    samples = scrape(metrics_client)

    methods = {dict(key)["method"] for name, key in samples if name == "uisps_http_requests_total"}
    assert "OTHER" in methods and not {"PROBE1", "PROBE2"} & methods


def test_each_app_has_its_own_registry(settings: Settings) -> None:
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        first.get("/healthz")
        assert ("uisps_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200"))) \
            not in scrape(second)


MULTIPROCESS_SCRIPT = """
from fastapi.testclient import TestClient
from api.app import create_app
with TestClient(create_app()) as first, TestClient(create_app()) as second:
    first.get("/healthz"); second.get("/healthz")
    print(first.get("/metrics").text)
"""


def test_multiprocess_mode_sums_every_process(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR the HTTP counters live in files that every scrape reads."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "UISPS_HOME": str(tmp_path / "home")}
    env.pop("UISPS_DATABASE_URL", None)
    run = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'uisps_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in run.stdout
    assert 'uisps_deletion_requests{state="queued"} 0.0' in run.stdout
    assert any(folder.iterdir())


def test_a_scrape_of_any_api_process_counts_the_requests_of_all(tmp_path: Path) -> None:
    """`uisps serve --workers 2`: each scrape reaches one of the two processes, and must still
    report every request (compose runs the API so by default)."""
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UISPS_", "PROMETHEUS_"))}
    env |= {"UISPS_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(tied_to_this_process([sys.executable, "-m", "uisps", "serve", "--no-worker", "--workers", "2",
                               "--port", str(port)]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the API did not start"
            time.sleep(0.3)
        before = _healthz_count(base)
        for _ in range(30):
            assert httpx.get(f"{base}/healthz", headers={"Connection": "close"}).status_code == 200

        counts = {_healthz_count(base) for _ in range(8)}  # new connections: either process answers
    finally:
        stop_process(server)

    assert counts == {before + 30}


def _healthz_count(base: str) -> float:
    import httpx

    with httpx.Client(base_url=base, headers={"Connection": "close"}) as http:  # type: ignore[arg-type]
        samples = scrape(http)  # type: ignore[arg-type]
    return samples.get(("uisps_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200"))), 0.0)
