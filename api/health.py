"""Liveness (/healthz: the process answers) and readiness (/readyz: database and broker reachable;
"degraded" when the artifact store takes no write)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.problems import problem_response, problem_responses
from core.broker import QUEUE

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_S = 3.0
# Checks that leave the API ready, "degraded": with the artifact store down, uploads, checkpoint
# downloads and jobs fail, but reads, cancels, certificates and the dashboard work, and an
# orchestrator that took every replica out of service for it would stop those too.
DEGRADING = frozenset({"artifact_store"})


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database and broker reachable (the artifact store's state is reported: degraded)",
    responses={200: {"content": {"application/json": {}}}, **problem_responses(503)},
)
def readyz(request: Request) -> Any:
    checks = {
        "database": _check_database(request),
        "broker": _check_broker(request),
        "artifact_store": _check_artifact_store(request),
    }
    failing = [name for name, result in checks.items() if result != "ok" and name not in DEGRADING]
    if not failing:
        degraded = any(checks[name] != "ok" for name in DEGRADING)
        return JSONResponse({"status": "degraded" if degraded else "ready", "checks": checks})
    failing = ", ".join(failing)
    return problem_response(
        request, 503, "not_ready", f"failing: {failing}", headers={"Retry-After": "5"}, checks=checks
    )


def _check_database(request: Request) -> str:
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        logger.warning("readiness: database check failed: %s", exc)
        return f"error: {type(exc).__name__}"
    return "ok"


def _check_broker(request: Request) -> str:
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            # Declaring the (durable, idempotent) queue is a real round trip on every transport;
            # a bare connection is lazy on some of them.
            connection.default_channel.queue_declare(queue=QUEUE, durable=True, auto_delete=False)
    except Exception as exc:
        logger.warning("readiness: broker check failed: %s", exc)
        return f"error: {type(exc).__name__}"
    return "ok"


def _check_artifact_store(request: Request) -> str:
    # Uploads and finished jobs write here: with the store down (S3, MinIO) or a full or read-only
    # disk each of them fails, which the check names (the API stays ready: DEGRADING).
    try:
        request.app.state.store.check_writable()
    except Exception as exc:
        logger.warning("readiness: artifact store check failed: %s", exc)
        return f"error: {type(exc).__name__}"
    return "ok"
