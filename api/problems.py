"""RFC 9457 problem details for every error the API returns, with what exactly is wrong.

Domain errors map to statuses here and nowhere else: no or bad API key 401, role not allowed 403,
unknown resource 404, purged checkpoint 410, If-Match not met 412, invalid input 422, conflicting state 409, oversized
upload 413, rate or concurrency limit 429, database or broker unreachable 503, and a value the
database refuses (one no validation caught) 400.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.methods import allowed_methods
from core.certificates import KeyFileError
from core.db import DATABASE_UNAVAILABLE
from core.errors import UisError
from core.services.errors import (
    ArtifactCorrupted,
    ArtifactMissing,
    CheckpointPurged,
    CheckpointTooLarge,
    Conflict,
    EvidenceBroken,
    Forbidden,
    IdempotencyKeyInUse,
    InvalidPageToken,
    InvalidParameters,
    NotFound,
    RateLimited,
    ServerBusy,
    Unauthenticated,
)
from core.storage import STORE_UNAVAILABLE, is_store_outage

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:uisps:problem:"
RETRY_AFTER_S = "5"


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where in the request, e.g. ['body', 'forget_labels', 0]")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document (media type application/problem+json)."""

    type: str = Field(description="URI naming the kind of problem", examples=["urn:uisps:problem:invalid_labels"])
    title: str = Field(examples=["Unprocessable Content"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["labels [12] are out of range: this model has classes 0..9"])
    instance: str = Field(description="the request path", examples=["/deletion-requests"])
    code: str = Field(description="machine-readable error code", examples=["invalid_labels"])
    errors: list[FieldError] | None = Field(None, description="each invalid field, for validation errors")


# RFC 9110's names where Python (before 3.13) still has RFC 7231's
_TITLES = {413: "Content Too Large", 416: "Range Not Satisfiable", 422: "Unprocessable Content"}


def title_of(status: int) -> str:
    return _TITLES.get(status) or HTTPStatus(status).phrase


def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": title_of(status),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extensions)
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem+json bodies (the only media type an
    error is sent as; `document_validation_problems` adds the Problem schema to the components)."""
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {status: {"description": title_of(status), "content": {PROBLEM_JSON: problem}} for status in statuses}


def _validation_errors(errors: Any) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _validation_errors(exc.errors())
    return problem_response(request, 422, "validation_error", _describe(errors), errors=errors)


async def _invalid_parameters(request: Request, exc: InvalidParameters) -> JSONResponse:
    errors = [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors]
    return problem_response(request, 422, exc.code, _describe(errors), errors=errors)


async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return problem_response(request, 404, exc.code, str(exc))


async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
    return problem_response(request, 409, exc.code, str(exc))


async def _too_large(request: Request, exc: CheckpointTooLarge) -> JSONResponse:
    return problem_response(request, 413, exc.code, str(exc))


async def _bad_page_token(request: Request, exc: InvalidPageToken) -> JSONResponse:
    return problem_response(request, 400, exc.code, str(exc))


async def _artifact_missing(request: Request, exc: ArtifactMissing) -> JSONResponse:
    logger.error("%s", exc)
    return problem_response(request, 500, exc.code, str(exc))


async def _checkpoint_purged(request: Request, exc: CheckpointPurged) -> JSONResponse:
    return problem_response(request, 410, exc.code, str(exc))


async def _unauthenticated(request: Request, exc: Unauthenticated) -> JSONResponse:
    challenge = 'Bearer realm="uisps"' + (', error="invalid_token"' if exc.invalid_token else "")
    return problem_response(request, 401, exc.code, str(exc), headers={"WWW-Authenticate": challenge})


async def _forbidden(request: Request, exc: Forbidden) -> JSONResponse:
    return problem_response(request, 403, exc.code, str(exc))


async def _rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
    status = 503 if isinstance(exc, ServerBusy) else 429
    return problem_response(request, status, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after_s)})


async def _idempotency_in_use(request: Request, exc: IdempotencyKeyInUse) -> JSONResponse:
    return problem_response(request, 409, exc.code, str(exc), headers={"Retry-After": "1"})


async def _artifact_corrupted(request: Request, exc: ArtifactCorrupted) -> JSONResponse:
    logger.error("%s", exc)
    return problem_response(request, 500, exc.code, str(exc))


async def _evidence_broken(request: Request, exc: EvidenceBroken) -> JSONResponse:
    logger.error("%s", exc)
    return problem_response(request, 500, exc.code, str(exc))


async def _signing_key(request: Request, exc: KeyFileError) -> JSONResponse:
    logger.error("certificate signing key: %s", exc)
    return problem_response(request, 500, "signing_key_unavailable", "the certificate signing key cannot be read; it has been logged")


async def _user_error(request: Request, exc: UisError) -> JSONResponse:
    return problem_response(request, 422, exc.code, str(exc))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "content_too_large", 416: "range_not_satisfiable"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    phrase = HTTPStatus(exc.status_code).phrase
    code = _HTTP_CODES.get(exc.status_code) or phrase.lower().replace(" ", "_").replace("-", "_")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette's Allow names one route's methods; the path may have several
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.scope))}
    return problem_response(request, exc.status_code, code, detail, headers=headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The database is down, unreachable or busy past the timeout: the caller should retry.
    logger.warning("database unavailable: %s", exc)
    return problem_response(
        request,
        503,
        "database_unavailable",
        "the database is unreachable or busy; retry shortly",
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def _database_refused_value(request: Request, exc: sa_exc.DataError) -> JSONResponse:
    # The database refused a value the request carried (a NUL in text, a number out of a column's
    # range). Input is validated before it reaches a query, so this is a check that is missing:
    # logged, but the client's input is still the cause, so it is a 4xx, never a 500.
    logger.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
    return problem_response(
        request, 400, "invalid_value", "a value in the request is one the database cannot store or compare"
    )


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    if is_store_outage(exc):
        # The object store is down or out of reach (boto's errors have no handler of their own:
        # which of them is an outage depends on the status). The request's transaction is rolled
        # back, so the same request can simply be sent again.
        logger.warning("artifact store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            request, 503, STORE_UNAVAILABLE, "the artifact store is unavailable (down, out of reach or full); retry shortly",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request, 500, "internal_error", "an unexpected error occurred; it has been logged")


def document_validation_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what validation errors really are: FastAPI documents its own
    422 body (HTTPValidationError as application/json), but this API answers problem+json. Every
    operation that takes a body also documents what `api.limits` answers before the route runs:
    413 for a body over its limit, and, for a JSON body, 415 for one that is not JSON."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        problem = {"$ref": "#/components/schemas/Problem"}
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                body = operation.get("requestBody", {}).get("content", {})
                refused = (413, 415) if "application/json" in body else (413,) if body else ()
                for status_code, refusal in problem_responses(*refused).items():
                    operation["responses"].setdefault(str(status_code), refusal)
                response = operation.get("responses", {}).get("422")
                if response is None:
                    continue
                content = response.get("content", {})
                json_schema = content.get("application/json", {}).get("schema", {})
                if json_schema.get("$ref", "").endswith("/HTTPValidationError"):
                    response["content"] = {PROBLEM_JSON: {"schema": problem}}
                    response["description"] = "Unprocessable Content (validation errors listed in `errors`)"
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "Problem" not in components:
            components.update(Problem.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
            components["Problem"] = {
                k: v for k, v in Problem.model_json_schema(ref_template="#/components/schemas/{model}").items()
                if k != "$defs"
            }
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidParameters, _invalid_parameters)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    app.add_exception_handler(Conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(CheckpointTooLarge, _too_large)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidPageToken, _bad_page_token)  # type: ignore[arg-type]
    app.add_exception_handler(ArtifactMissing, _artifact_missing)  # type: ignore[arg-type]
    app.add_exception_handler(CheckpointPurged, _checkpoint_purged)  # type: ignore[arg-type]
    app.add_exception_handler(ArtifactCorrupted, _artifact_corrupted)  # type: ignore[arg-type]
    app.add_exception_handler(EvidenceBroken, _evidence_broken)  # type: ignore[arg-type]
    app.add_exception_handler(KeyFileError, _signing_key)  # type: ignore[arg-type]
    app.add_exception_handler(Unauthenticated, _unauthenticated)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, _forbidden)  # type: ignore[arg-type]
    app.add_exception_handler(RateLimited, _rate_limited)  # type: ignore[arg-type]
    app.add_exception_handler(IdempotencyKeyInUse, _idempotency_in_use)  # type: ignore[arg-type]
    app.add_exception_handler(UisError, _user_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    for error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error, _database_unavailable)
    # DataError: the value itself is wrong (PostgreSQL: NUL in text, out of range, bad encoding).
    app.add_exception_handler(sa_exc.DataError, _database_refused_value)  # type: ignore[arg-type]
    # api.observability.RequestContext answers these first; this is the backstop outside it
    app.add_exception_handler(Exception, internal_error)
