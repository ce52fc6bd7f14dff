"""The facts a succeeded request's certificate states, and the digest that fixes them at success.

A certificate is built from database rows at each download (so a later format or signing key
states the same facts). Unlike the audit log, those rows are not append-only: whoever can write
to the database could change a version's metrics or a request's labels, and every certificate
downloaded afterwards would state the new values under a valid signature. So the request's
`deletion_request.succeeded` audit event records `evidence_sha256`, the sha256 of these facts as
they were when it succeeded, and a certificate is refused (500 `evidence_mismatch`) when the rows
no longer hash to it. The event itself is in the hash chain, and its hash is in the certificate.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import DeletionRequest, ModelVersion, ModelVersionRequest


def evidence_sha256(session: Session, request: DeletionRequest, base: ModelVersion, result: ModelVersion) -> str:
    """The sha256 of every stored value a certificate of `request` is built from."""
    model = request.model
    linked = session.scalars(
        select(ModelVersionRequest.deletion_request_id).where(ModelVersionRequest.model_version_id == result.id)
    )
    facts: dict[str, Any] = {
        "request": {
            "id": request.id, "tenant_id": request.tenant_id, "model_id": request.model_id,
            "external_ref": request.external_ref, "method": request.method,
            "forget_labels": list(request.forget_labels), "params": request.params or {},
            "base_version": request.base_version, "result_version": request.result_version,
            "attempts": request.attempts, "created_at": iso(request.created_at),
            "started_at": iso(request.started_at), "finished_at": iso(request.finished_at),
        },
        "model": {
            "id": model.id, "name": model.name, "architecture": model.architecture,
            "data_source": model.data_source, "class_names": list(model.class_names),
        },
        "base": {"version": base.version, "sha256": base.sha256, "forgotten_labels": list(base.forgotten_labels)},
        "result": {
            "version": result.version, "sha256": result.sha256, "size_bytes": result.size_bytes,
            "forgotten_labels": list(result.forgotten_labels), "created_at": iso(result.created_at),
            "metrics": result.metrics or {}, "deletion_request_id": result.deletion_request_id,
            "deletion_request_ids": sorted(linked),
        },
    }
    # Sorted keys, no spaces: the same bytes for the same values, read back from either database.
    # (Not RFC 8785, which refuses a NaN a metric might hold: a digest must never fail a success.)
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value is not None else None
