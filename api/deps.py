"""Typed dependencies: the request's session (commit on success), tenant and actor (from the API
key, see api.auth), store, dispatcher, certificate signer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from api.auth import PrincipalDep
from core.certificates import Signer
from core.services.deletion_requests.service import Dispatch
from core.services.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest
from core.settings import Settings
from core.storage import ArtifactStore


def get_settings(request: Request) -> Settings:
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


def current_tenant(principal: PrincipalDep) -> str:
    """The caller's tenant, from its API key. Every query filters by it."""
    return principal.tenant_id


def current_actor(principal: PrincipalDep) -> str:
    """Who the audit log names for this request: `api_key:<id>`."""
    return principal.actor


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_dispatch(request: Request) -> Dispatch:
    return request.app.state.dispatch


def get_signer(request: Request) -> Signer:
    return request.app.state.signer


def page_request(
    page_size: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"items per page (default {DEFAULT_PAGE_SIZE})")
    ] = DEFAULT_PAGE_SIZE,
    page_token: Annotated[
        str | None, Query(max_length=1000, description="next_page_token of the previous page")
    ] = None,
) -> PageRequest:
    return PageRequest(size=page_size, token=page_token or None)


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
