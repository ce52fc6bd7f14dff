"""Errors the services raise; the API maps each to an HTTP status, the worker to a job outcome."""

from __future__ import annotations

from typing import Any

from core.errors import UisError


class NotFound(Exception):
    """No such resource *for this tenant* (another tenant's id is reported the same way)."""

    code = "not_found"

    def __init__(self, resource: str, identifier: object) -> None:
        super().__init__(f"{resource} {identifier!s} does not exist")
        self.resource = resource
        self.identifier = identifier


class Conflict(Exception):
    """The request is valid but the resource's current state does not allow it."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


class InvalidParameters(UisError):
    """Hyperparameter overrides that `UnlearnConfig` refuses; `errors` lists each problem."""

    code = "invalid_parameters"

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


class UnsupportedMethod(UisError):
    code = "unsupported_method"


class CheckpointTooLarge(UisError):
    code = "checkpoint_too_large"


class ArtifactCorrupted(UisError):
    """A stored checkpoint no longer hashes to its recorded sha256: never load it."""

    code = "artifact_corrupted"


class InvalidPageToken(UisError):
    code = "invalid_page_token"


class ArtifactMissing(Exception):
    """A version's checkpoint is gone from artifact storage: an operator must restore it."""

    code = "artifact_missing"


class EvidenceBroken(Exception):
    """A succeeded request's records no longer match its audit trail (changed since, or its
    success event is gone): no certificate is issued for it; an operator must look."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class CheckpointPurged(Exception):
    """A version's checkpoint was purged on request: its record stays, its bytes are gone for good."""

    code = "checkpoint_purged"


class Unauthenticated(Exception):
    """No API key, or one that is unknown or revoked (401)."""

    code = "unauthenticated"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token


class Forbidden(Exception):
    """A valid key whose role may not do this (403)."""

    code = "forbidden"


class RateLimited(Exception):
    """Too many requests for now (429); `retry_after_s` says when to try again."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class TooManyActiveRequests(RateLimited):
    code = "too_many_active_requests"


class ServerBusy(RateLimited):
    """This process has no room for the work now, whoever asks (503 with Retry-After)."""

    code = "server_busy"


class IdempotencyKeyInUse(Conflict):
    """A request with this Idempotency-Key is still being processed (409): retry shortly."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="idempotency_key_in_use")


class IdempotencyKeyReused(UisError):
    """The Idempotency-Key was first used with another request (422)."""

    code = "idempotency_key_reused"


class RequestNotSucceeded(Conflict):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_not_succeeded")
