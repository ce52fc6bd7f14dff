"""/webhook-secret: the secret that signs the caller's tenant's webhook events, for its receivers,
and its rotation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from api.auth import require
from api.deps import ActorDep, SessionDep, SettingsDep, TenantDep
from api.methods import served_for_head
from api.problems import problem_responses
from core.db import ApiKeyRole, utcnow
from core.services.webhooks.secrets import SecretState, reveal_tenant_secret, rotate_tenant_secret
from core.settings import MAX_WEBHOOK_SECRET_OVERLAP_S

router = APIRouter(
    tags=["webhooks"],
    # The compliance system runs the receivers of the requests it makes; an admin sets them up.
    dependencies=[Depends(require("read the webhook signing secret", ApiKeyRole.COMPLIANCE, ApiKeyRole.ADMIN))],
    responses=problem_responses(401, 403, 429, 503),
)


class WebhookSecret(BaseModel):
    tenant_id: str
    secret: str = Field(
        description="`whsec_<base64>`: the Standard Webhooks secret that verifies this tenant's events",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )
    generation: int = Field(description="how many times the tenant rotated it")
    previous_signs_until: datetime | None = Field(
        description="after a rotation: until then, events also carry a signature by the secret before this "
        "one (`UISPS_WEBHOOK_SECRET_OVERLAP_S`), so receivers still using it accept them; null when none does",
    )


@router.get(
    "/webhook-secret",
    response_model=WebhookSecret,
    responses=problem_responses(409),
    summary="The secret your tenant's webhook events are signed with (roles compliance, admin)",
    description=(
        "Every tenant's events are signed with a secret of its own: verify them with this one "
        "(`standardwebhooks.Webhook(secret).verify(body, headers)`). It stays the same until your "
        "tenant rotates it (`POST /webhook-secret/rotate`) or the operator rotates the service's. Each "
        "reading is recorded in the audit log (`webhook_secret.revealed`). 409 `webhooks_not_configured` "
        "when the service sends no webhooks."
    ),
)
def get_webhook_secret(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep, tenant_id: TenantDep,
    actor: ActorDep,
) -> WebhookSecret:
    revealed = reveal_tenant_secret(
        session, tenant_id=tenant_id, actor=actor, settings=settings, record=not served_for_head(request)
    )
    return _shown(response, tenant_id, *revealed)


@router.post(
    "/webhook-secret/rotate",
    response_model=WebhookSecret,
    dependencies=[Depends(require("rotate the webhook signing secret", ApiKeyRole.ADMIN))],
    responses=problem_responses(409),
    summary="Replace your tenant's webhook signing secret (role admin)",
    description=(
        "For a secret that leaked or whose holder left, or routinely: events sent from now on are "
        "signed with the new secret returned here and, until `previous_signs_until` (`overlap_s` seconds "
        "from now; by default the operator's `UISPS_WEBHOOK_SECRET_OVERLAP_S`, 24 h unless changed), also "
        "with the one before, so receivers keep accepting them while you put the new secret in. A receiver "
        "that switched accepts only the new signature, so a leaked old secret forges nothing there; "
        "`overlap_s=0` stops the old signature at once all the same. Rotating again within the overlap "
        "drops the oldest at once. Recorded in the audit log (`webhook_secret.rotated`). Takes no "
        "Idempotency-Key (its answer is a secret, which the service does not store to replay): after "
        "a lost answer, read `GET /webhook-secret` and its `generation` before rotating again."
    ),
)
def rotate_webhook_secret(
    response: Response, session: SessionDep, settings: SettingsDep, tenant_id: TenantDep, actor: ActorDep,
    overlap_s: Annotated[float | None, Query(
        ge=0, le=MAX_WEBHOOK_SECRET_OVERLAP_S,
        description="seconds the previous secret goes on signing events beside the new one (default: the "
        "service's UISPS_WEBHOOK_SECRET_OVERLAP_S)")] = None,
) -> WebhookSecret:
    return _shown(response, tenant_id, *rotate_tenant_secret(
        session, tenant_id=tenant_id, actor=actor, settings=settings, overlap_s=overlap_s))


def _shown(response: Response, tenant_id: str, secret: str, state: SecretState) -> WebhookSecret:
    response.headers["Cache-Control"] = "no-store"  # a secret: never kept by a cache
    until = state.previous_signs_until
    return WebhookSecret(tenant_id=tenant_id, secret=secret, generation=state.generation,
                         previous_signs_until=until if until is not None and until > utcnow() else None)
