"""The FastAPI application: `create_app()` (uvicorn: `uvicorn --factory api.app:create_app`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import CapacityLimiter, Semaphore
from fastapi import FastAPI
from sqlalchemy import exists, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool
from starlette.concurrency import run_in_threadpool

from api.api_keys.endpoints import router as api_keys_router
from api.audit_events.endpoints import router as audit_events_router
from api.certificates.endpoints import router as certificates_router
from api.dashboard.endpoints import router as dashboard_router
from api.deletion_requests.endpoints import router as deletion_requests_router
from api.health import router as health_router
from api.limits import BodySizeLimit, UploadGate
from api.methods import HeadAsGet
from api.metrics import HttpMetrics
from api.metrics import router as metrics_router
from api.models.endpoints import router as models_router
from api.observability import RequestContext
from api.openapi import install_response_headers
from api.problems import document_validation_problems, install_problem_handlers
from api.webhooks.endpoints import router as webhooks_router
from core.broker import make_celery, send_deletion_request
from core.certificates import Signer
from core.db import ApiKey, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.db.session import make_read_sessionmaker
from core.logs import configure_logging, root_configured_elsewhere
from core.services.api_keys.cache import KeyCache
from core.services.api_keys.rate_limit import TENANT_BUCKET_PREFIX, make_rate_limiter
from core.settings import Settings, get_settings
from core.storage import make_artifact_store

DESCRIPTION = """
Make trained image classifiers forget whole classes without reading those classes' data
(UISPS: data-free inversion, selective parameter suppression).

Register a **model**, upload a safetensors checkpoint as **version 1**, then POST a
**deletion request**; a worker produces version n+1, whose checkpoint downloads with its sha256.
Every change and download is recorded in a hash-chained **audit log**, and every succeeded
request has a signed **certificate**.

Authenticate with an API key of your tenant: `Authorization: Bearer <key>` (`uisps keys create`).
Roles: `reader` reads, `compliance` also creates and cancels deletion requests, `admin` also
registers models, uploads versions and manages keys. POSTs that create accept an
`Idempotency-Key`. Errors are `application/problem+json` (RFC 9457).
"""

logger = logging.getLogger(__name__)

DB_CONNECT_TIMEOUT_S = 5


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not root_configured_elsewhere():  # uvicorn leaves the root logger alone; a host may not
        configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        # Alembic, not create_all: the schema a deployment runs is the one its migrations made.
        await run_in_threadpool(upgrade, settings.effective_database_url)
        engine = make_engine(settings.effective_database_url, **_engine_options(settings))
        celery = make_celery(settings)
        app.state.engine = engine
        app.state.sessions = make_sessionmaker(engine)
        app.state.read_sessions = make_read_sessionmaker(engine)
        # Reads at once in worker threads (UISPS_API_READ_THREADS), never more than the pool's size,
        # so none opens a connection of its own.
        pool_size = engine.pool.size() if isinstance(engine.pool, QueuePool) else settings.api_read_threads
        app.state.read_limiter = CapacityLimiter(max(1, min(settings.api_read_threads, pool_size)))
        # Keys checked against the database at once (a cache miss): a flood of unknown keys, which
        # no rate limit can charge, holds at most these connections, not the whole pool.
        app.state.key_check_limiter = CapacityLimiter(max(1, pool_size // 4))
        app.state.store = make_artifact_store(settings)
        app.state.celery = celery
        app.state.dispatch = lambda request_id, priority: send_deletion_request(celery, request_id, priority)
        app.state.signer = Signer(
            settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
        )
        app.state.key_cache = KeyCache(settings.api_key_cache_ttl_s)
        slots = max(1, settings.max_concurrent_uploads)
        app.state.upload_slots = Semaphore(slots, max_value=slots)
        receiving = settings.max_receiving_uploads
        app.state.receiving_uploads = Semaphore(receiving, max_value=receiving)
        app.state.rate_limiter = make_rate_limiter(
            settings.rate_limit_backend, settings.rate_limit_per_s, settings.rate_limit_burst,
            settings.effective_broker_url,
        )
        app.state.tenant_rate_limiter = make_rate_limiter(
            settings.rate_limit_backend, settings.tenant_rate_limit_per_s, settings.tenant_rate_limit_burst,
            settings.effective_broker_url, scope="tenant", prefix=TENANT_BUCKET_PREFIX,
        )
        await run_in_threadpool(_warn_without_keys, app.state.sessions)
        # What start-up built (modules, the app, SQLAlchemy's and pydantic's caches: ~170k objects)
        # lives as long as the process: kept out of the cyclic GC, a full collection pauses the
        # event loop for ~1 ms instead of ~100 ms, which every request in flight would wait for.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await app.state.rate_limiter.close()
            await app.state.tenant_rate_limiter.close()
            celery.close()
            engine.dispose()

    app = FastAPI(
        title="UISPS unlearning-as-a-service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_problem_handlers(app)
    document_validation_problems(app)
    install_response_headers(app)
    app.add_middleware(HeadAsGet)  # innermost: the outer layers log and count the HEAD as such
    app.add_middleware(UploadGate, idle_timeout_s=settings.upload_idle_timeout_s)
    app.add_middleware(BodySizeLimit, upload_limit=settings.max_upload_bytes)  # outside the gate: no database for a 413
    # Added last, so outermost: a body-limit refusal has a request id and is counted too.
    app.state.metrics = HttpMetrics(lambda: app.state.sessions(), settings.metrics_recent_jobs)
    app.add_middleware(RequestContext, metrics=app.state.metrics, access_log=settings.access_log)
    for router in (
        health_router,
        metrics_router,
        models_router,
        deletion_requests_router,
        audit_events_router,
        api_keys_router,
        certificates_router,
        dashboard_router,
        webhooks_router,
    ):
        app.include_router(router)
    return app


def _warn_without_keys(sessions: Any) -> None:
    try:
        with sessions() as session:
            if session.scalar(select(exists().where(ApiKey.revoked_at.is_(None)))):
                return
    except Exception:  # the database is away: /readyz says so
        return
    logger.warning(
        "no API keys exist yet: every request will be refused (401). "
        "Create one with `uisps keys create --tenant default --role admin`."
    )


def _engine_options(settings: Settings) -> dict[str, Any]:
    if make_url(settings.effective_database_url).get_backend_name() == "postgresql":
        # An unreachable server must turn into a quick 503, not a request hanging on connect.
        return {
            "connect_args": {"connect_timeout": DB_CONNECT_TIMEOUT_S},
            "pool_timeout": 10,
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
        }
    return {}
