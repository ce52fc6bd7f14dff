"""The response headers the API sends, in its OpenAPI document.

FastAPI derives bodies and status codes from the routes but not the headers the endpoints and
handlers set, so a client generated from the document would not know of `Location`,
`Retry-After` or a checkpoint's sha256. They are added here by rule (none is marked required:
some depend on the storage backend or on whether a response was replayed).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.idempotency import REPLAYED_HEADER
from api.observability import REQUEST_ID_HEADER

_CHECKPOINT = {
    "ETag": "the sha256, quoted",
    "X-Checkpoint-SHA256": "the sha256 of the checkpoint's bytes, hex",
    "Repr-Digest": "sha-256=:<base64>: (RFC 9530)",
    "Digest": "sha-256=<base64> (RFC 3230, for older clients)",
    "Cache-Control": "private, no-cache: a cache asks again before each use, so a purge reaches it",
    "Content-Disposition": "attachment; the file name to save it as",
    "Accept-Ranges": "bytes, with local artifact storage only",
    "Last-Modified": "with local artifact storage only",
}


def _headers_for(path: str, method: str, status: str, operation: dict[str, Any]) -> dict[str, str]:
    """Header name -> description for one response of one operation."""
    headers = {REQUEST_ID_HEADER: "the request's id, as logged (echoes a well-formed one sent)"}
    takes_idempotency_key = any(
        p.get("in") == "header" and p.get("name") == "Idempotency-Key" for p in operation.get("parameters", [])
    )
    if status in ("429", "503") or (status == "409" and takes_idempotency_key):
        headers["Retry-After"] = "seconds to wait before sending the request again"
    if status == "401":
        headers["WWW-Authenticate"] = 'Bearer, with error="invalid_token" for a bad key'
    if method == "post" and status == "202":  # a deletion request, made or asked to cancel
        headers["Location"] = "the deletion request: poll it"
        headers["Retry-After"] = "seconds to wait before the first poll"
    if method == "post" and status == "201":
        headers["Location"] = "the resource created"
    if method == "post" and status in ("201", "202") and takes_idempotency_key:
        headers[REPLAYED_HEADER] = "true when this is the stored answer to an earlier request with this key"
    if path.endswith("/checkpoint") and method in ("get", "head") and status in ("200", "206"):
        headers.update(_CHECKPOINT)
    if path.endswith("/checkpoint") and method in ("get", "head") and status == "304":
        headers.update({name: _CHECKPOINT[name] for name in ("ETag", "Cache-Control")})
    if status in ("206", "416"):
        headers["Content-Range"] = "bytes first-last/size, or bytes */size for a 416"
    if path == "/certificate-key" and status == "200":
        headers["X-Key-Id"] = "the id of the key, as certificates name it"
    return headers


def document_response_headers(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the headers of every response to an OpenAPI document, in place; returns it."""
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                documented = response.setdefault("headers", {})
                for name, description in _headers_for(path, method, status, operation).items():
                    documented.setdefault(name, {"description": description, "schema": {"type": "string"}})
    return schema


def install_response_headers(app: FastAPI) -> None:
    """Make `app.openapi()` document the response headers (built once, as FastAPI caches it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_response_headers(build())  # build() stores the schema in app.openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
