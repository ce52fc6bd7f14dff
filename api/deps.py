"""Typed dependencies: the request's session (commit on success), tenant and actor (from the API
key, see api.auth), store, dispatcher, certificate signer.

Those that do no I/O are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
and each such hop costs more CPU than the dependency itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from anyio import to_thread
from fastapi import Depends, HTTPException, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from api.auth import PrincipalDep
from core.certificates import Signer
from core.services.deletion_requests.service import Dispatch
from core.services.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest
from core.settings import Settings
from core.storage import ArtifactStore

T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the handler succeeds, rolled back otherwise.

    Work registered with core.services.transactions.after_commit (sending a deletion request to
    the broker) runs inside the commit, so it never happens for a rolled-back request.
    """
    session: Session = request.app.state.sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def read_only(request: Request, work: Callable[[Session], T]) -> T:
    """`work(session)` on a session that only reads (core.db.session.make_read_sessionmaker), in a
    worker thread: one thread hop for a whole read endpoint, rather than one for each `def`
    dependency, the handler and its response validation (call it from an `async def` endpoint)."""
    state = request.app.state
    return await to_thread.run_sync(_run_read, state.read_sessions, work, limiter=state.read_limiter)


def _run_read(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    with sessions() as session:
        return work(session)


async def current_tenant(principal: PrincipalDep) -> str:
    """The caller's tenant, from its API key. Every query filters by it."""
    return principal.tenant_id


async def current_actor(principal: PrincipalDep) -> str:
    """Who the audit log names for this request: `api_key:<id>`."""
    return principal.actor


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_dispatch(request: Request) -> Dispatch:
    return request.app.state.dispatch


async def get_signer(request: Request) -> Signer:
    return request.app.state.signer


async def page_request(
    page_size: Annotated[
        int,
        Query(
            ge=0,
            description=f"items per page: 0 or absent for the default ({DEFAULT_PAGE_SIZE}), "
            f"more than {MAX_PAGE_SIZE} served as {MAX_PAGE_SIZE}",
        ),
    ] = 0,
    page_token: Annotated[
        str | None, Query(description="next_page_token of the previous page")
    ] = None,
) -> PageRequest:
    # AIP-158: 0 asks for the default and a size above the maximum is lowered to it, so a client
    # that asks for "as many as you allow" gets a page rather than an error; negative is refused.
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    return PageRequest(size=size, token=page_token or None)


async def require_json_body(request: Request) -> None:
    """415 for a body sent as another media type than JSON (`application/json`, `...+json`), or
    with none: FastAPI does not read it as JSON and answers 422 with a field error, which sends
    the client looking in the wrong place (`curl -d` sends form-urlencoded unless told otherwise)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json") or not await request.body():
        return
    shown = media_type or "no Content-Type"
    raise HTTPException(415, f"the request body must be JSON (Content-Type: application/json), not {shown}")


json_body = Depends(require_json_body)
SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": commit before the response is sent, so a 201/202 means the row is durable and
# a failed commit is reported to the caller rather than after the fact.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
TenantDep = Annotated[str, Depends(current_tenant)]
ActorDep = Annotated[str, Depends(current_actor)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
DispatchDep = Annotated[Dispatch, Depends(get_dispatch)]
SignerDep = Annotated[Signer, Depends(get_signer)]
PageDep = Annotated[PageRequest, Depends(page_request)]
