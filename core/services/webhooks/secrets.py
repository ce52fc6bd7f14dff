"""A tenant's webhook signing secret: handed to the tenant (its receivers verify events with it)
and rotated by it. Only the generation is stored (table webhook_secrets); the secret is derived.

After a rotation, events carry a second signature by the secret before for an overlap (fixed at
the rotation: UISPS_WEBHOOK_SECRET_OVERLAP_S or what the rotation asked for), so receivers take the
new secret on their own schedule and refuse no event meanwhile. This gives nobody anything: whoever
holds the old secret could sign any event with it anyway, and a receiver that switched accepts
only the new signature."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import WebhookSecret, record_event, utcnow
from core.db.audit import lock_tenant
from core.services.errors import Conflict
from core.services.transactions import begin_write
from core.services.webhooks.signing import tenant_secret
from core.settings import Settings


@dataclass(frozen=True)
class SecretState:
    """Where a tenant's secret stands: its generation, and until when the one before also signs."""

    generation: int = 0
    previous_signs_until: datetime | None = None

    def signing_generations(self, now: datetime) -> tuple[int, ...]:
        """The generations whose secrets sign an event sent at `now`, the current one first."""
        if self.generation > 0 and self.previous_signs_until is not None and now < self.previous_signs_until:
            return (self.generation, self.generation - 1)
        return (self.generation,)


def secret_states(session: Session, tenant_ids: Iterable[str]) -> dict[str, SecretState]:
    """Each tenant's secret state (generation 0 for a tenant without a row)."""
    wanted = set(tenant_ids)
    if not wanted:
        return {}
    query = select(WebhookSecret).where(WebhookSecret.tenant_id.in_(wanted))
    found = {row.tenant_id: SecretState(row.generation, row.previous_signs_until) for row in session.scalars(query)}
    return {tenant: found.get(tenant, SecretState()) for tenant in wanted}


def reveal_tenant_secret(
    session: Session, *, tenant_id: str, actor: str, settings: Settings, record: bool = True
) -> tuple[str, SecretState]:
    """The tenant's `whsec_` secret and its generation; each reading is recorded in the tenant's
    audit log, since whoever holds it can make events the tenant's receivers accept (`record`: not
    for a HEAD, which sends none of it)."""
    service_secret = _service_secret(settings)
    begin_write(session)
    state = secret_states(session, [tenant_id])[tenant_id]
    if record:
        record_event(
            session, tenant_id=tenant_id, actor=actor, action="webhook_secret.revealed",
            subject_type="tenant", subject_id=tenant_id, details={"generation": state.generation},
        )
    return tenant_secret(service_secret, tenant_id, state.generation), state


def rotate_tenant_secret(
    session: Session, *, tenant_id: str, actor: str, settings: Settings, overlap_s: float | None = None
) -> tuple[str, SecretState]:
    """A new secret for the tenant (the next generation). Events sent from the commit on are signed
    with it and, for `overlap_s` (default UISPS_WEBHOOK_SECRET_OVERLAP_S), with the one before; the
    one before that signs none. Recorded in the tenant's audit log."""
    service_secret = _service_secret(settings)
    overlap = settings.webhook_secret_overlap_s if overlap_s is None else overlap_s
    begin_write(session)
    lock_tenant(session, tenant_id)  # two rotations at once make two generations, not one twice
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        row = WebhookSecret(tenant_id=tenant_id, generation=0)
        session.add(row)
    now = utcnow()
    row.generation += 1
    row.rotated_at = now
    row.previous_signs_until = now + timedelta(seconds=overlap) if overlap > 0 else None
    until = row.previous_signs_until
    record_event(
        session, tenant_id=tenant_id, actor=actor, action="webhook_secret.rotated",
        subject_type="tenant", subject_id=tenant_id,
        details={"generation": row.generation, "previous_signs_until": iso_z(until)},
    )
    return tenant_secret(service_secret, tenant_id, row.generation), SecretState(row.generation, until)


def iso_z(value: datetime | None) -> str | None:
    """As the API and the webhook events write times (ISO 8601, UTC, `Z`)."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z") if value else None


def _service_secret(settings: Settings) -> str:
    if settings.webhook_secret is None:
        raise Conflict(
            "this service sends no webhooks: its operator has not set UISPS_WEBHOOK_SECRET",
            code="webhooks_not_configured",
        )
    return settings.webhook_secret.get_secret_value()
