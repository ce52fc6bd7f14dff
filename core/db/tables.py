"""ORM tables: models, model versions, deletion requests, audit events, API keys, idempotency keys,
webhook deliveries and their attempts.

Every row carries ``tenant_id``: an API key belongs to one tenant and every query filters by it. JSON columns use the portable ``sqlalchemy.JSON`` so SQLite and PostgreSQL
run the same code.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db.base import UUID_LENGTH, Base, tenant_column, utcnow, uuid_pk

HASH_LENGTH = 64
CALLBACK_URL_LENGTH = 2048


class JobState(StrEnum):
    """Life cycle of a deletion request (AIP-151 style long-running operation)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_STATE_VALUES = ", ".join(f"'{state.value}'" for state in JobState)
_ACTIVE_STATES = f"state IN ('{JobState.QUEUED.value}', '{JobState.RUNNING.value}')"


class Model(Base):
    """A registered classifier; its checkpoints live in ``ModelVersion`` rows."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(200))
    # A key into the architecture registry (e.g. "smallcnn", "torchvision:resnet50").
    architecture: Mapped[str] = mapped_column(String(200))
    arch_kwargs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    num_classes: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    input_shape: Mapped[list[int]] = mapped_column(JSON)  # [C, H, W]
    mean: Mapped[list[float]] = mapped_column(JSON)
    std: Mapped[list[float]] = mapped_column(JSON)
    # A data spec string ("digits", "npz:/path/to/file.npz") naming the training data.
    data_source: Mapped[str] = mapped_column(String(1000))
    owner: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version"
    )


class ModelVersion(Base):
    """An immutable checkpoint of a model. By convention rows are never updated, except once to
    record that the checkpoint's bytes were purged (the row stays: lineage and audit need it)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column()
    model_id: Mapped[str] = mapped_column(String(UUID_LENGTH), ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    # Content-addressed, so versions with the same bytes share a key (indexed for the purge's check).
    artifact_key: Mapped[str] = mapped_column(String(500), index=True)
    sha256: Mapped[str] = mapped_column(String(HASH_LENGTH))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    # Cumulative: every label forgotten by this version and its ancestors.
    forgotten_labels: Mapped[list[int]] = mapped_column(JSON, default=list)
    # The request whose job made it (with coalescing, the one that claimed the job; every request
    # it was made for is in `request_links`). Unique so a retried job never makes two versions.
    deletion_request_id: Mapped[str | None] = mapped_column(
        String(UUID_LENGTH), ForeignKey("deletion_requests.id"), unique=True
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when the checkpoint was purged (ModelService.purge_checkpoint); never cleared.
    checkpoint_purged_at: Mapped[datetime | None] = mapped_column()

    model: Mapped[Model] = relationship(back_populates="versions")
    request_links: Mapped[list[ModelVersionRequest]] = relationship(viewonly=True)

    @property
    def deletion_request_ids(self) -> list[str]:
        """Every request this version was made for: the one that ran the job first, then the others."""
        others = sorted(link.deletion_request_id for link in self.request_links)
        if self.deletion_request_id is None:
            return others
        return [self.deletion_request_id, *(i for i in others if i != self.deletion_request_id)]


class ModelVersionRequest(Base):
    """A deletion request a version was made for: one per version, or several when queued requests
    were coalesced into one job. The primary key keeps a request in at most one version."""

    __tablename__ = "model_version_requests"

    deletion_request_id: Mapped[str] = mapped_column(
        String(UUID_LENGTH), ForeignKey("deletion_requests.id"), primary_key=True
    )
    model_version_id: Mapped[str] = mapped_column(String(UUID_LENGTH), ForeignKey("model_versions.id"), index=True)


class DeletionRequest(Base):
    """A request to forget labels from a model version, run as a background job."""

    __tablename__ = "deletion_requests"
    __table_args__ = (
        CheckConstraint(f"state IN ({_STATE_VALUES})", name="state"),
        Index(
            "ix_deletion_requests_tenant_model_state_created",
            "tenant_id",
            "model_id",
            "state",
            "created_at",
        ),
        # The table only grows; these keep the hot scans off its history (migration 0010).
        Index(
            "ix_deletion_requests_active", "tenant_id", "created_at",
            postgresql_where=text(_ACTIVE_STATES), sqlite_where=text(_ACTIVE_STATES),
        ),
        Index("ix_deletion_requests_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_deletion_requests_state_finished", "state", "finished_at"),
    )

    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column()
    model_id: Mapped[str] = mapped_column(String(UUID_LENGTH), ForeignKey("models.id"))
    forget_labels: Mapped[list[int]] = mapped_column(JSON)
    # The version the job unlearns from. Named by the caller, it stays; left out
    # (follows_latest), it is the latest when the request is made and moves to the latest again
    # when its job starts, so requests that run one after the other build on each other.
    base_version: Mapped[int] = mapped_column(Integer)
    follows_latest: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    method: Mapped[str] = mapped_column(String(64), default="uisps", server_default="uisps")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    external_ref: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(
        String(16), default=JobState.QUEUED.value, server_default=JobState.QUEUED.value
    )
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"code": ..., "message": ...}
    result_version: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # A running job whose lease has passed is presumed orphaned by a crashed worker.
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # When a message for this request was last sent to the broker (the reconciler re-sends
    # requests whose message seems lost, at most once per period, whichever worker notices).
    dispatched_at: Mapped[datetime | None] = mapped_column()
    # Where the final-state event is POSTed (core.services.webhooks); checked when the request is made.
    callback_url: Mapped[str | None] = mapped_column(String(CALLBACK_URL_LENGTH))
    # Set when another request's job runs this one too (request coalescing): the request that
    # claimed the job. Its job's progress, outcome and version are this request's.
    coalesced_into: Mapped[str | None] = mapped_column(
        String(UUID_LENGTH), ForeignKey("deletion_requests.id"), index=True
    )

    model: Mapped[Model] = relationship()
    webhook_delivery: Mapped[WebhookDelivery | None] = relationship(
        back_populates="deletion_request", uselist=False, viewonly=True
    )


class AuditEvent(Base):
    """Append-only, hash-chained record of state changes and downloads (see core.db.audit)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        # The chain is walked per tenant in id order.
        Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),
        Index("ix_audit_events_subject", "subject_type", "subject_id"),
    )

    # BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an auto-incrementing rowid.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant_id: Mapped[str] = tenant_column(index=False)  # covered by the (tenant_id, id) index
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    subject_type: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str] = mapped_column(String(64))
    # Not a foreign key: the log must outlive the rows it talks about.
    model_id: Mapped[str | None] = mapped_column(String(UUID_LENGTH), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    hash: Mapped[str] = mapped_column(String(HASH_LENGTH))


class ApiKeyRole(StrEnum):
    """What a key may do: admin manages models, versions and keys; compliance asks for deletions;
    every role reads its tenant's resources."""

    ADMIN = "admin"
    COMPLIANCE = "compliance"
    READER = "reader"


_ROLE_VALUES = ", ".join(f"'{role.value}'" for role in ApiKeyRole)


class ApiKey(Base):
    """An API key of one tenant. Only the sha256 of the key is stored; the key is shown once."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"role IN ({_ROLE_VALUES})", name="role"),)

    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column()
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    # The key's first characters, so people can tell their keys apart; not enough to use it.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(HASH_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class WebhookSecret(Base):
    """Which generation of its webhook signing secret a tenant is at (no row: generation 0). The
    secret itself is derived, never stored (core.services.webhooks.signing); rotating it moves the
    generation on, so what anyone read before verifies no event sent after `previous_signs_until`."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    rotated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Until then, events carry a second signature by generation - 1 (None: they do not).
    previous_signs_until: Mapped[datetime | None] = mapped_column()


class IdempotencyState(StrEnum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"


class IdempotencyKey(Base):
    """The first response to a POST sent with an Idempotency-Key, replayed to its retries."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "api_key_id", "key"),)

    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column(index=False)  # covered by the unique constraint
    api_key_id: Mapped[str] = mapped_column(String(UUID_LENGTH), ForeignKey("api_keys.id"))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 over the method, path and body: the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(HASH_LENGTH))
    state: Mapped[str] = mapped_column(String(16), default=IdempotencyState.IN_FLIGHT.value)
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class WebhookDeliveryState(StrEnum):
    PENDING = "pending"  # due at next_attempt_at (or in flight while lease_expires_at is ahead)
    SUCCEEDED = "succeeded"  # the receiver answered 2xx
    FAILED = "failed"  # attempts used up, or an address that may never be called


_DELIVERY_STATE_VALUES = ", ".join(f"'{state.value}'" for state in WebhookDeliveryState)


class WebhookDelivery(Base):
    """The event a deletion request's final state sends to its callback URL (a transactional outbox).

    Written in the same transaction as the final state, so a crash cannot lose it; the workers'
    webhook sender claims due rows with a lease and records every attempt.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(f"state IN ({_DELIVERY_STATE_VALUES})", name="state"),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    # Also the `webhook-id` header: the same on every attempt, so receivers can drop duplicates.
    id: Mapped[str] = uuid_pk()
    tenant_id: Mapped[str] = tenant_column()
    # One final state per request, so one event.
    deletion_request_id: Mapped[str] = mapped_column(
        String(UUID_LENGTH), ForeignKey("deletion_requests.id"), unique=True
    )
    event_type: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(String(CALLBACK_URL_LENGTH))
    # The exact body: every attempt sends (and signs) the same bytes.
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(
        String(16), default=WebhookDeliveryState.PENDING.value, server_default=WebhookDeliveryState.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set while an attempt is in flight; a sender that died leaves it to run out.
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    last_attempt_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    deletion_request: Mapped[DeletionRequest] = relationship(back_populates="webhook_delivery")
    attempt_rows: Mapped[list[WebhookDeliveryAttempt]] = relationship(
        order_by="WebhookDeliveryAttempt.attempt", viewonly=True
    )


class WebhookDeliveryAttempt(Base):
    """One POST of a webhook delivery: when, how long, what the receiver answered or what went wrong."""

    __tablename__ = "webhook_delivery_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    delivery_id: Mapped[str] = mapped_column(String(UUID_LENGTH), ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Null while in flight; an attempt whose sender died is closed by the next one ("sender_lost").
    finished_at: Mapped[datetime | None] = mapped_column()
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
