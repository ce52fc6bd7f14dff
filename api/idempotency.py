"""The `Idempotency-Key` header of the POSTs that create (models, versions, deletion requests).

A handler calls `start(payload)` first: it returns the stored response when this is a retry of a
request that succeeded (status, body and Location replayed, plus `Idempotent-Replayed: true`), or
None to go on. Once the resource exists the handler calls `finish(...)`, which stores the response
and commits it together with the resource. A request that fails releases its key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.auth import PrincipalDep
from api.deps import SessionDep
from core.services.api_keys.service import Principal
from core.services.idempotency.service import Replay, fingerprint, idempotency_service

logger = logging.getLogger(__name__)

REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description=(
            "Makes retries safe: the same key with the same request replays the first response "
            "(for 24 h); with another request it is a 422, and while the first is still running a 409. "
            "Keys are scoped to your API key."
        ),
    ),
]


class Idempotency:
    def __init__(self, request: Request, principal: Principal, key: str | None) -> None:
        self._request = request
        self._principal = principal
        self.key = key
        self.record_id: str | None = None

    def start(self, payload: Any, earlier_form: Any = None) -> JSONResponse | None:
        """None to go on with the request, or the first response to replay; `payload` is what the
        request asks for (for a JSON body, `sent(body)`). `earlier_form`: the same request in the form the
        service fingerprinted before `sent` (the whole validated body, defaults included), so that
        a key claimed before the deploy that brought `sent` still replays. It can go once every such
        key has expired (UISPS_IDEMPOTENCY_TTL_S after that deploy)."""
        if self.key is None:
            return None
        settings = self._request.app.state.settings
        method, path = self._request.method, self._request.url.path
        outcome = idempotency_service.begin(
            self._request.app.state.sessions,
            tenant_id=self._principal.tenant_id,
            api_key_id=self._principal.key_id,
            key=self.key,
            fingerprint=fingerprint(method, path, payload),
            also_matches=() if earlier_form is None else (fingerprint(method, path, earlier_form),),
            ttl_s=settings.idempotency_ttl_s,
            lock_s=settings.idempotency_lock_s,
        )
        if isinstance(outcome, Replay):
            return JSONResponse(outcome.body, status_code=outcome.status, headers={**outcome.headers, REPLAYED_HEADER: "true"})
        self.record_id = outcome
        return None

    def finish(self, session: Session, status: int, body: BaseModel, headers: dict[str, str]) -> None:
        """Store the response with the resource and commit both (or, without a key, do nothing:
        the request's session commits as usual)."""
        if self.record_id is None:
            return
        idempotency_service.complete(
            session, self.record_id, status=status, body=body.model_dump(mode="json"), headers=headers
        )
        session.commit()
        self.record_id = None

    def release(self) -> None:
        if self.record_id is None:
            return
        record_id, self.record_id = self.record_id, None
        try:
            idempotency_service.release(self._request.app.state.sessions, record_id)
        except Exception:
            # The database is away: the key stays "in flight" until idempotency_lock_s passes.
            logger.warning("could not release Idempotency-Key record %s", record_id, exc_info=True)


def idempotency(
    request: Request, principal: PrincipalDep, session: SessionDep, key: IdempotencyKeyHeader = None
) -> Iterator[Idempotency]:
    handle = Idempotency(request, principal, key)
    try:
        yield handle
    finally:
        if handle.record_id is not None:
            # The request failed (or never finished): let the client retry with the key. Its
            # transaction ends first: on SQLite it may hold the write lock the release needs.
            session.rollback()
            handle.release()


IdempotencyDep = Annotated[Idempotency, Depends(idempotency, scope="function")]


def sent(body: BaseModel) -> dict[str, Any]:
    """What the client sent in `body` (the fields it set, nested too), not the defaults this
    release fills in: a retry that comes after a deploy which changed a default is the same
    request, not "a different request" (which the client would then send again under a new key,
    making the duplicate the key is there to prevent)."""
    return body.model_dump(mode="json", exclude_unset=True)
