"""A tenant's webhook signing secret, handed to the tenant (its receivers verify events with it)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.db import record_event
from core.services.errors import Conflict
from core.services.transactions import begin_write
from core.services.webhooks.signing import tenant_secret
from core.settings import Settings


def reveal_tenant_secret(session: Session, *, tenant_id: str, actor: str, settings: Settings) -> str:
    """The tenant's `whsec_` secret; each reading is recorded in the tenant's audit log, since
    whoever holds it can make events the tenant's receivers accept."""
    if settings.webhook_secret is None:
        raise Conflict(
            "this service sends no webhooks: its operator has not set UISPS_WEBHOOK_SECRET",
            code="webhooks_not_configured",
        )
    begin_write(session)
    record_event(
        session, tenant_id=tenant_id, actor=actor, action="webhook_secret.revealed",
        subject_type="tenant", subject_id=tenant_id,
    )
    return tenant_secret(settings.webhook_secret.get_secret_value(), tenant_id)
