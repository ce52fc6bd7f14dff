"""Rules of deletion requests on the API side: create (validated against the base version), read, cancel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from core.certificates import CERTIFICATE_FORMAT, CERTIFICATE_TYPE, LEGACY_FORMAT, fits_jcs
from core.config import UnlearnConfig
from core.db import AuditEvent, DeletionRequest, JobState, ModelVersion, record_event, utcnow
from core.db.audit import lock_tenant
from core.errors import InvalidLabels
from core.services.deletion_requests.evidence import evidence_sha256, iso
from core.services.deletion_requests.fairness import dispatch_priority
from core.services.deletion_requests.repository import deletion_request_repository
from core.services.errors import (
    Conflict,
    EvidenceBroken,
    InvalidParameters,
    NotFound,
    RequestNotSucceeded,
    TooManyActiveRequests,
    UnsupportedMethod,
)
from core.services.models.repository import model_repository
from core.services.pagination import Page, PageRequest
from core.services.transactions import after_commit, begin_write
from core.services.webhooks.service import webhook_service
from core.services.webhooks.urls import check_callback_url
from core.settings import Settings

SUPPORTED_METHODS = ("uisps",)
ACTIVE_LIMIT_RETRY_AFTER_S = 30

# Sends a request's id to the workers, with its priority (core.services.deletion_requests.fairness).
Dispatch = Callable[[str, int], None]


class DeletionRequestService:
    def create(
        self,
        session: Session,
        *,
        tenant_id: str,
        actor: str,
        settings: Settings,
        model_id: str,
        forget_labels: Sequence[int],
        base_version: int | None = None,
        method: str = "uisps",
        params: dict[str, Any] | None = None,
        external_ref: str | None = None,
        callback_url: str | None = None,
        dispatch: Dispatch,
    ) -> DeletionRequest:
        """Record a request and hand it to a worker once the row is committed."""
        if method not in SUPPORTED_METHODS:
            raise UnsupportedMethod(f"method {method!r} is not supported (supported: {', '.join(SUPPORTED_METHODS)})")
        normalised_params = _validate_params(params or {})
        if callback_url is not None:
            check_callback_url(callback_url, settings)
        if len(forget_labels) > settings.max_labels_per_request:
            raise InvalidLabels(
                f"{len(forget_labels)} labels given; at most {settings.max_labels_per_request} per request"
            )
        begin_write(session)
        # One tenant's creates are serialised from here on, so the count below stays true, and
        # with the tenant's purges, so the base version's checkpoint cannot be purged under us.
        lock_tenant(session, tenant_id)
        model = model_repository.get(session, tenant_id, model_id)
        if model is None:
            raise NotFound("model", model_id)
        base = self._base_version(session, tenant_id, model_id, base_version)
        labels = _check_labels(list(forget_labels), model.num_classes, base.forgotten_labels)
        _check_carried_leave_a_class(labels, base, model_repository.forgotten_so_far(session, tenant_id, model_id),
                                     model.num_classes)
        _check_params_fit_model(normalised_params, model.architecture, model.input_shape[0], model.num_classes)
        active = deletion_request_repository.count_active(session, tenant_id)
        if active >= settings.max_active_requests_per_tenant:
            raise TooManyActiveRequests(
                f"this tenant has {active} deletion requests queued or running; at most "
                f"{settings.max_active_requests_per_tenant} at once: retry when some have finished",
                retry_after_s=ACTIVE_LIMIT_RETRY_AFTER_S,
            )
        request = DeletionRequest(
            tenant_id=tenant_id,
            model_id=model_id,
            forget_labels=labels,
            base_version=base.version,
            follows_latest=base_version is None,
            method=method,
            params=normalised_params,
            external_ref=external_ref,
            callback_url=callback_url,
            state=JobState.QUEUED.value,
            dispatched_at=utcnow(),
        )
        session.add(request)
        session.flush()
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="deletion_request.created",
            subject_type="deletion_request",
            subject_id=request.id,
            model_id=model_id,
            details={
                "forget_labels": labels,
                "base_version": base.version,
                "base_sha256": base.sha256,
                "method": method,
                "params": normalised_params,
                "external_ref": external_ref,
                "callback_url": callback_url,
            },
        )
        request_id, priority = request.id, dispatch_priority(active)
        after_commit(session, lambda: dispatch(request_id, priority))
        return request

    def get(self, session: Session, tenant_id: str, request_id: str) -> DeletionRequest:
        request = deletion_request_repository.get(session, tenant_id, request_id)
        if request is None:
            raise NotFound("deletion request", request_id)
        return request

    def get_row(self, session: Session, tenant_id: str, request_id: str) -> Row[Any]:
        """Like `get`, the columns only (a plain row: cheaper to read, no relationships)."""
        row = deletion_request_repository.get_row(session, tenant_id, request_id)
        if row is None:
            raise NotFound("deletion request", request_id)
        return row

    def list(
        self,
        session: Session,
        tenant_id: str,
        page: PageRequest,
        *,
        model_id: str | None = None,
        state: JobState | None = None,
    ) -> Page[DeletionRequest]:
        return deletion_request_repository.list(session, tenant_id, page, model_id=model_id, state=state)

    def cancel(self, session: Session, *, tenant_id: str, actor: str, request_id: str) -> DeletionRequest:
        """queued -> cancelled now; running -> cancel_requested (the worker stops at its next report);
        cancelled stays so, nothing recorded; succeeded or failed: 409."""
        begin_write(session)
        request = deletion_request_repository.get(session, tenant_id, request_id, for_update=True)
        if request is None:
            raise NotFound("deletion request", request_id)
        state = JobState(request.state)
        if state is JobState.CANCELLED:
            return request  # asked again (its answer lost, say): it is what was asked for
        if state.is_terminal:
            raise Conflict(
                f"deletion request {request_id} is already {state.value}; only queued or running requests can be cancelled",
                code="request_finished",
            )
        if state is JobState.RUNNING and request.cancel_requested:
            return request  # asked twice: nothing new to record
        if state is JobState.QUEUED:
            request.state = JobState.CANCELLED.value
            request.finished_at = utcnow()
            request.stage = None
            action = "deletion_request.cancelled"
        else:
            request.cancel_requested = True
            action = "deletion_request.cancel_requested"
        session.flush()
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action=action,
            subject_type="deletion_request",
            subject_id=request.id,
            model_id=request.model_id,
            details={"previous_state": state.value, "state": request.state},
        )
        if state is JobState.QUEUED:
            webhook_service.enqueue_final_event(session, request)
        return request

    def certificate(
        self,
        session: Session,
        *,
        tenant_id: str,
        actor: str,
        request_id: str,
        sign: Callable[[dict[str, Any]], dict[str, Any]],
        record: bool = True,
    ) -> dict[str, Any]:
        """The signed certificate of a succeeded request (`sign`: core.certificates.Signer.sign);
        the download is audited (`record`: not for a HEAD, which sends none of it)."""
        content = self.certificate_content(session, tenant_id, request_id)
        document = sign(content)
        if not record:
            return document
        session.commit()  # end the read before taking the write lock (SQLite)
        begin_write(session)
        record_event(
            session,
            tenant_id=tenant_id,
            actor=actor,
            action="deletion_request.certificate_downloaded",
            subject_type="deletion_request",
            subject_id=request_id,
            model_id=content["model"]["id"],
            details={"key_id": document["signature"]["key_id"], "new_sha256": content["new_checkpoint"]["sha256"]},
        )
        return document

    def certificate_content(self, session: Session, tenant_id: str, request_id: str) -> dict[str, Any]:
        """What a succeeded request's certificate states, built from its immutable records.

        Every value comes from fields that never change once the request succeeded (of the request,
        its versions, the audit event of its success; a purge sets only a version's
        `checkpoint_purged_at`), so signing it again gives the same file. Nothing is stored: each
        download builds and signs it anew, so after an upgrade to another format or a key rotation
        the same request downloads as other bytes stating the same facts (and an earlier file
        still verifies).
        """
        request = self.get(session, tenant_id, request_id)
        if request.state != JobState.SUCCEEDED.value or request.result_version is None:
            raise RequestNotSucceeded(
                f"deletion request {request_id} is {request.state}; only a succeeded request has a certificate"
            )
        model = request.model
        base = model_repository.get_version(session, tenant_id, request.model_id, request.base_version)
        result = model_repository.version_for_request(session, request.id)
        if base is None or result is None:  # versions are never deleted
            raise RuntimeError(f"the versions of deletion request {request_id} are missing")
        succeeded = session.scalar(
            select(AuditEvent)
            .where(
                AuditEvent.tenant_id == tenant_id,
                AuditEvent.subject_type == "deletion_request",
                AuditEvent.subject_id == request.id,
                AuditEvent.action == "deletion_request.succeeded",
            )
            .order_by(AuditEvent.id)
            .limit(1)
        )
        _check_evidence(session, request, base, result, succeeded)
        report = result.metrics or {}
        content: dict[str, Any] = {
            "type": CERTIFICATE_TYPE,
            "format": CERTIFICATE_FORMAT,
            "request_id": request.id,
            "tenant_id": request.tenant_id,
            "external_ref": request.external_ref,
            "model": {
                "id": model.id,
                "name": model.name,
                "architecture": model.architecture,
                "data_source": model.data_source,
            },
            "labels": {
                "forgotten": list(request.forget_labels),
                "class_names": [model.class_names[label] for label in request.forget_labels],
                "previously_forgotten": list(base.forgotten_labels),
                # other versions of the model forgot these and the base still knew them: forgotten too
                "carried": list(report.get("carried_labels", [])),
                "forgotten_by_result": list(result.forgotten_labels),
            },
            "method": request.method,
            "parameters": {"overrides": request.params or {}, "effective": report.get("config")},
            "base_checkpoint": {"version": base.version, "sha256": base.sha256},
            "new_checkpoint": {"version": result.version, "sha256": result.sha256, "size_bytes": result.size_bytes},
            "metrics": {
                # the labels acc_forget and the MIA were measured on: with coalesced or carried
                # labels, more than this request's own (`labels.forgotten`)
                "measured_labels": report.get("forget_labels"),
                "before": report.get("before"),
                "after": report.get("after"),
                "frozen_fraction": report.get("frozen_fraction"),
                "retained_train_samples": report.get("retained_train_samples"),
                "mia_definition": report.get("mia_definition"),
                "splits": report.get("splits"),
            },
            "code_version": report.get("code_version"),
            "device": report.get("device"),
            "attempts": request.attempts,
            "timestamps": {
                "requested_at": iso(request.created_at),
                "started_at": iso(request.started_at),
                "finished_at": iso(request.finished_at),
                "new_checkpoint_created_at": iso(result.created_at),
            },
            "audit_event": {"id": succeeded.id, "hash": succeeded.hash, "action": succeeded.action},
        }
        others = [i for i in result.deletion_request_ids if i != request.id]
        if others:
            # One job served several requests: the new checkpoint also forgot their labels.
            content["coalesced_with"] = others
        if not fits_jcs(content):
            # An integer RFC 8785 cannot hold (a seed beyond 2**53 - 1, accepted before UnlearnConfig
            # bounded it): Python's form states it exactly, and format 1 still verifies everywhere.
            content["format"] = LEGACY_FORMAT
        return content

    def _base_version(self, session: Session, tenant_id: str, model_id: str, number: int | None) -> ModelVersion:
        if number is None:
            base = model_repository.latest_version(session, tenant_id, model_id)
            if base is None:
                raise Conflict(
                    f"model {model_id} has no versions yet; upload a checkpoint first", code="model_has_no_versions"
                )
        else:
            base = model_repository.get_version(session, tenant_id, model_id, number)
            if base is None:
                raise NotFound(f"model {model_id}: version", number)
        if base.checkpoint_purged_at is not None:
            raise Conflict(
                f"the checkpoint of model {model_id} version {base.version} was purged; "
                "ask for a version whose checkpoint is kept (base_version)",
                code="checkpoint_purged",
            )
        return base


def _check_evidence(
    session: Session, request: DeletionRequest, base: ModelVersion, result: ModelVersion, succeeded: AuditEvent | None
) -> None:
    """EvidenceBroken unless the request's success event is there and its records still match
    the digest it recorded (evidence.py); one that succeeded before digests were recorded has
    none to match."""
    if succeeded is None:
        raise EvidenceBroken(f"deletion request {request.id} succeeded, but its success event is missing from the "
                             "audit log: no certificate is issued", code="evidence_missing")
    expected = (succeeded.details or {}).get("evidence_sha256")
    if expected is not None and evidence_sha256(session, request, base, result) != expected:
        raise EvidenceBroken(f"the records of deletion request {request.id} changed since it succeeded (they no "
                             f"longer match audit event {succeeded.id}): no certificate is issued",
                             code="evidence_mismatch")


def unlearn_config(params: dict[str, Any]) -> UnlearnConfig:
    """The configuration of a request's `params` overrides, or InvalidParameters: the caller's 422
    when the request is made, and in a job (a request queued before an upgrade that refuses its
    overrides) a failure of the input, not one to retry."""
    try:
        return UnlearnConfig.model_validate(params)
    except ValidationError as exc:
        errors = [{"loc": ["params", *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in exc.errors()]
        where = ".".join(map(str, errors[0]["loc"]))
        raise InvalidParameters(f"{where}: {errors[0]['msg']}", errors) from None


def _validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check overrides now so a bad one is the caller's 422, not a failed job an hour later."""
    config = unlearn_config(params)
    # Only what the caller set is stored: the defaults may improve before the job runs, and the
    # job's report records the full configuration it used.
    return config.model_dump(mode="json", exclude_unset=True)


def _check_params_fit_model(params: dict[str, Any], architecture: str, in_channels: int, num_classes: int) -> None:
    """Overrides that depend on the architecture (how many feature blocks to regrow, a head to
    reset, features to scrub) are checked against it now: the job would fail on them after loading
    checkpoint and data."""
    if not any(params.get(field) for field in ("reset_blocks", "reset_head", "feature_scrub")):
        return
    from core.architectures import model_skeleton  # torch: only for these overrides
    from core.errors import ArchitectureError
    from core.uisps import blocks_to_reset, check_feature_scrub, resets_head

    config = UnlearnConfig.model_validate(params)
    skeleton = model_skeleton(architecture, in_channels, num_classes)
    for field, check in (("reset_blocks", lambda: blocks_to_reset(skeleton, config)),
                         ("reset_head", lambda: resets_head(skeleton, num_classes, config)),
                         ("feature_scrub", lambda: check_feature_scrub(skeleton, config))):
        try:
            check()
        except ArchitectureError as exc:
            error = {"loc": ["params", field], "msg": str(exc), "type": "value_error"}
            raise InvalidParameters(f"params.{field}: {exc}", [error]) from None


def _check_carried_leave_a_class(labels: list[int], base: ModelVersion, so_far: set[int], num_classes: int) -> None:
    """A job also forgets what other versions of the model forgot and its base still knows
    (`DeletionJobs.claim`): refused now where that would leave no class, not as a failed job."""
    carried = sorted(so_far - set(base.forgotten_labels) - set(labels))
    if carried and len(so_far | set(base.forgotten_labels) | set(labels)) >= num_classes:
        raise InvalidLabels(
            f"version {base.version} still knows labels {carried}, which other versions of this model forgot "
            "and every later version forgets too: with them, forgetting every class would leave nothing to classify"
        )


def _check_labels(labels: list[int], num_classes: int, already_forgotten: list[int]) -> list[int]:
    from core.validation import check_labels

    return check_labels(labels, num_classes, already_forgotten)


deletion_request_service = DeletionRequestService()
