"""Request and response bodies of /deletion-requests (an AIP-151 style long-running operation)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from core.config import UnlearnConfig
from core.db import DeletionRequest, JobState, WebhookDelivery, WebhookDeliveryState
from core.services.text import NulFree


class DeletionRequestCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model_id": "3f1c2a9e-5b7d-4e1a-9c3b-2d8f6a7e1b40", "forget_labels": [3], "external_ref": "GDPR-1234"},
                {
                    "model_id": "3f1c2a9e-5b7d-4e1a-9c3b-2d8f6a7e1b40",
                    "forget_labels": [0, 1],
                    "base_version": 2,
                    "method": "uisps",
                    "params": {"inversion": {"iterations": 500}, "lr": 0.05},
                },
            ]
        },
    )

    model_id: Annotated[str, StringConstraints(min_length=1, max_length=64), NulFree]
    forget_labels: list[StrictInt] = Field(min_length=1, description="class indices to forget")
    base_version: StrictInt | None = Field(
        None, ge=1, le=2**31 - 1, description=(
            "the version to unlearn from; default: the latest when its job starts. Whatever the base, the job "
            "also forgets the labels other versions of the model forgot (`carried_labels` in its report)"
        ),
    )
    method: Literal["uisps"] = Field("uisps", description="unlearning method")
    params: UnlearnConfig | None = Field(
        None, description="hyperparameter overrides; anything left out takes the service's default"
    )
    external_ref: Annotated[str, StringConstraints(max_length=200), NulFree] | None = Field(
        None, description="the caller's reference, e.g. a ticket id"
    )
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048), NulFree] | None = Field(
        None,
        description=(
            "where to POST a signed event (Standard Webhooks) when the request ends: https, a host the "
            "operator allows (UISPS_WEBHOOK_ALLOWED_HOSTS), no credentials or fragment"
        ),
        examples=["https://hooks.example.com/uisps"],
    )

    def param_overrides(self) -> dict[str, Any]:
        """Only the fields the caller set (nested too), so defaults are not frozen into the request."""
        return self.params.model_dump(mode="json", exclude_unset=True) if self.params is not None else {}


class JobError(BaseModel):
    code: str = Field(examples=["invalid_labels", "internal_error"])
    message: str


class WebhookAttemptRead(BaseModel):
    attempt: int
    started_at: datetime
    finished_at: datetime | None = Field(description="null while the attempt is in flight")
    status_code: int | None = Field(description="the receiver's HTTP status; null when it gave none")
    error: str | None = Field(description="why the attempt did not deliver the event")


class WebhookDeliveryRead(BaseModel):
    """The final-state event sent to `callback_url`, and every attempt to deliver it."""

    id: str = Field(description="the `webhook-id` header of every attempt: receivers drop duplicates by it")
    event_type: str = Field(examples=["deletion_request.succeeded"])
    state: Literal["pending", "succeeded", "failed"]
    attempts: list[WebhookAttemptRead]
    next_attempt_at: datetime | None = Field(description="when the next attempt is due, while pending")
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> WebhookDeliveryRead:
        pending = delivery.state == WebhookDeliveryState.PENDING.value
        return cls(
            id=delivery.id,
            event_type=delivery.event_type,
            state=delivery.state,  # type: ignore[arg-type]
            attempts=[
                WebhookAttemptRead(
                    attempt=a.attempt, started_at=a.started_at, finished_at=a.finished_at,
                    status_code=a.status_code, error=a.error,
                )
                for a in delivery.attempt_rows
            ],
            next_attempt_at=delivery.next_attempt_at if pending else None,
            created_at=delivery.created_at,
            finished_at=delivery.finished_at,
        )


class DeletionRequestRead(BaseModel):
    id: str
    model_id: str
    forget_labels: list[int]
    base_version: int = Field(
        description="the version the job unlearns from; with follows_latest, the latest when its job starts"
    )
    follows_latest: bool = Field(
        description="made without base_version: base_version moves to a newer version made before its job starts"
    )
    method: str
    params: dict[str, Any]
    external_ref: str | None
    callback_url: str | None
    state: JobState
    stage: str | None = Field(
        description="while running: starting, loading, evaluation, inversion, fisher, unlearning, storing"
    )
    progress: float = Field(ge=0, le=1, description="overall progress, 0..1")
    attempts: int
    cancel_requested: bool
    error: JobError | None = Field(description="set when state is failed")
    result_version: int | None = Field(description="the version this request produced, once succeeded")
    coalesced_into: str | None = Field(
        description=(
            "set when this request ran in another queued request's job (request coalescing): that "
            "request's id. Both end with the same result_version"
        )
    )
    metrics: dict[str, Any] | None = Field(description="the unlearning report, once succeeded")
    webhook: WebhookDeliveryRead | None = Field(
        description="the event sent to callback_url once the request ended; null before, or without a callback_url"
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, request: DeletionRequest) -> DeletionRequestRead:
        return cls(
            id=request.id,
            model_id=request.model_id,
            forget_labels=request.forget_labels,
            base_version=request.base_version,
            follows_latest=request.follows_latest,
            method=request.method,
            params=request.params or {},
            external_ref=request.external_ref,
            callback_url=request.callback_url,
            state=JobState(request.state),
            stage=request.stage,
            progress=request.progress,
            attempts=request.attempts,
            cancel_requested=request.cancel_requested,
            error=JobError.model_validate(request.error) if request.error else None,
            result_version=request.result_version,
            coalesced_into=request.coalesced_into,
            metrics=request.metrics,
            # Only a request with a callback has a delivery: the others cost no query.
            webhook=(
                WebhookDeliveryRead.of(request.webhook_delivery)
                if request.callback_url and request.webhook_delivery is not None
                else None
            ),
            created_at=request.created_at,
            updated_at=request.updated_at,
            started_at=request.started_at,
            finished_at=request.finished_at,
        )


class DeletionRequestList(BaseModel):
    deletion_requests: list[DeletionRequestRead]
    next_page_token: str = Field(description="pass as page_token for the next page; empty on the last page")


class CertificateSignature(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str = Field(description="sha256 of the raw public key, as 'sha256:<hex>'; see GET /certificate-keys")
    value: str = Field(
        description="base64 signature over the certificate object in canonical JSON: RFC 8785 for format 2"
    )


class DeletionCertificate(BaseModel):
    certificate: dict[str, Any] = Field(
        description=(
            "type, format (2: signed as RFC 8785 JSON; 1: Python's json.dumps form), "
            "request_id, tenant_id, model, labels, method, parameters, base_checkpoint and "
            "new_checkpoint (version, sha256), metrics, code_version, timestamps, audit_event"
        )
    )
    signature: CertificateSignature
