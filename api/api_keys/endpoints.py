"""/api-keys: an admin manages its own tenant's keys (operators use `uisps keys ...`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from api.api_keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyRead
from api.auth import manage_keys
from api.deps import ActorDep, PageDep, SessionDep, SettingsDep, TenantDep, json_body
from api.problems import problem_responses
from core.services.api_keys.service import api_key_service
from core.services.text import NulFree
from core.services.transactions import after_commit

router = APIRouter(
    prefix="/api-keys",
    tags=["api keys"],
    dependencies=[manage_keys],
    responses=problem_responses(401, 403, 429, 503),
)

KeyId = Annotated[str, Path(max_length=64, description="the API key's id"), NulFree]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    responses=problem_responses(400, 409, 422),
    dependencies=[json_body],
    summary="Create an API key for your tenant (role admin)",
    description=(
        "The response holds the key itself, shown this once. Not idempotent: a retry makes another key. "
        "409 `too_many_api_keys` when the tenant holds `UISPS_MAX_API_KEYS_PER_TENANT` (100) unrevoked keys."
    ),
)
def create_api_key(
    body: ApiKeyCreate, response: Response, session: SessionDep, settings: SettingsDep, tenant_id: TenantDep,
    actor: ActorDep,
) -> ApiKeyCreated:
    created = api_key_service.create(
        session, tenant_id=tenant_id, role=body.role, name=body.name, actor=actor,
        max_keys=settings.max_api_keys_per_tenant,
    )
    response.headers["Location"] = f"/api-keys/{created.record.id}"
    response.headers["Cache-Control"] = "no-store"
    return ApiKeyCreated(**ApiKeyRead.of(created.record).model_dump(), key=created.secret)


@router.get("", response_model=ApiKeyList, responses=problem_responses(400), summary="List your tenant's API keys")
def list_api_keys(session: SessionDep, tenant_id: TenantDep, page: PageDep) -> ApiKeyList:
    result = api_key_service.list(session, tenant_id, page)
    return ApiKeyList(api_keys=[ApiKeyRead.of(k) for k in result.items], next_page_token=result.next_page_token)


@router.get("/{key_id}", response_model=ApiKeyRead, responses=problem_responses(404), summary="Get an API key")
def get_api_key(key_id: KeyId, session: SessionDep, tenant_id: TenantDep) -> ApiKeyRead:
    return ApiKeyRead.of(api_key_service.get(session, tenant_id, key_id))


@router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyRead,
    responses=problem_responses(404),
    summary="Revoke an API key (refused within UISPS_API_KEY_CACHE_TTL_S; revoking twice is harmless)",
)
def revoke_api_key(
    key_id: KeyId, request: Request, session: SessionDep, tenant_id: TenantDep, actor: ActorDep
) -> ApiKeyRead:
    revoked = api_key_service.revoke(session, tenant_id=tenant_id, key_id=key_id, actor=actor)
    # Once committed, this process forgets the key at once (others within UISPS_API_KEY_CACHE_TTL_S).
    after_commit(session, lambda: request.app.state.key_cache.forget(revoked.id))
    return ApiKeyRead.of(revoked)
