"""Prometheus metrics: `GET /metrics` (text format, unauthenticated like /healthz: serve it on an
internal network only).

Two sources:
- the database, read at scrape time (`JobsCollector`): deletion requests by state, queue depth,
  failed jobs, mean seconds per job stage over the most recent succeeded jobs. Counted across
  tenants (an operator's view) and never labelled by tenant; correct whichever API process is
  scraped, and covering the workers without a push gateway;
- this process's HTTP traffic (`HttpMetrics`, updated by api.observability's middleware):
  requests and their latency by method, route template and status. Every uvicorn worker process
  counts its own, unless PROMETHEUS_MULTIPROC_DIR is set (prometheus_client's multiprocess mode:
  every process writes its values there and a scrape of any of them sums them all).

Each app has its own CollectorRegistry: nothing is global, so test apps do not share counters.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from core.db import DeletionRequest
from core.db.tables import JobState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Stage names come from the job's report; anything unexpected is not turned into a label.
STAGE_NAME = re.compile(r"[a-z][a-z0-9_:]{0,47}")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class JobsCollector:
    """Deletion-request metrics computed from the database at each scrape."""

    def __init__(self, sessions: Callable[[], Any], recent_jobs: int) -> None:
        self._sessions = sessions
        self._recent_jobs = recent_jobs

    def describe(self) -> Iterable[Metric]:
        return []  # no collect() at registration: the database may not exist yet

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("uisps_metrics_database_up", "1 if the database answered this scrape's queries")
        try:
            counts, stage_means, samples = self._query()
        except Exception as exc:  # a scrape still answers (HTTP metrics) while the database is away
            logger.warning("metrics: database query failed: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_state = GaugeMetricFamily(
            "uisps_deletion_requests", "Deletion requests by state (all tenants)", labels=["state"]
        )
        for state in JobState:
            by_state.add_metric([state.value], counts.get(state.value, 0))
        yield by_state
        yield GaugeMetricFamily(
            "uisps_queue_depth", "Deletion requests queued, waiting for a worker", value=counts.get(JobState.QUEUED.value, 0)
        )
        yield CounterMetricFamily(
            "uisps_job_failures", "Deletion requests that ended failed", value=counts.get(JobState.FAILED.value, 0)
        )
        means = GaugeMetricFamily(
            "uisps_job_stage_seconds_mean",
            f"Mean seconds per job stage over the last {self._recent_jobs} succeeded deletion requests",
            labels=["stage"],
        )
        for stage, mean in sorted(stage_means.items()):
            means.add_metric([stage], mean)
        yield means
        yield GaugeMetricFamily(
            "uisps_job_stage_seconds_samples",
            "How many succeeded deletion requests uisps_job_stage_seconds_mean averages",
            value=samples,
        )

    def _query(self) -> tuple[dict[str, int], dict[str, float], int]:
        with self._sessions() as session:
            counts = {
                state: int(count)
                for state, count in session.execute(
                    select(DeletionRequest.state, func.count()).group_by(DeletionRequest.state)
                )
            }
            reports = session.scalars(
                select(DeletionRequest.metrics)
                .where(DeletionRequest.state == JobState.SUCCEEDED.value)
                .order_by(DeletionRequest.finished_at.desc())
                .limit(self._recent_jobs)
            ).all()
        totals: dict[str, float] = {}
        seen: dict[str, int] = {}
        samples = 0
        for report in reports:
            timings = report.get("timings") if isinstance(report, dict) else None
            if not isinstance(timings, dict):
                continue
            samples += 1
            for stage, seconds in timings.items():
                if isinstance(stage, str) and STAGE_NAME.fullmatch(stage) and isinstance(seconds, (int, float)):
                    totals[stage] = totals.get(stage, 0.0) + float(seconds)
                    seen[stage] = seen.get(stage, 0) + 1
        return counts, {stage: totals[stage] / seen[stage] for stage in totals}, samples


class HttpMetrics:
    """This process's HTTP requests (counter) and latency (histogram), by method, route template
    and status; plus the registry that /metrics renders."""

    def __init__(self, sessions: Callable[[], Any], recent_jobs: int) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode the values live in files under PROMETHEUS_MULTIPROC_DIR and a fresh
        # registry reads them all at each scrape; the metrics themselves are registered nowhere.
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry
        labels = ["method", "route", "status"]
        self.requests = Counter(
            "uisps_http_requests", "HTTP requests handled", labels, registry=own
        )
        self.latency = Histogram(
            "uisps_http_request_duration_seconds", "HTTP request latency", labels, registry=own,
            buckets=LATENCY_BUCKETS,
        )
        self.jobs = JobsCollector(sessions, recent_jobs)
        self.registry.register(self.jobs)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # The method is whatever the client sent: each new one would be new series, without a key.
        labels = (method if method in _KNOWN_METHODS else "OTHER", route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.jobs)
        return generate_latest(registry)


@router.get(
    "/metrics",
    summary="Prometheus metrics (unauthenticated: expose on an internal network only)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
