"""A small client of the service's HTTP API (used by `uisps demo` and the end-to-end tests)."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class ServiceError(Exception):
    """The service answered with an error (its problem+json detail) or not at all."""


@dataclass(frozen=True)
class VerifiedCheckpoint:
    data: bytes
    sha256: str


class UispsClient:
    """Sends `api_key` as a bearer token, and an Idempotency-Key with every POST that creates.

    A create whose answer was lost (connection dropped, timeout) or that met a 503 or a
    still-running twin (409 idempotency_key_in_use) is sent again with the same key, up to
    `retries` times: the service then answers with what the first one did, never a duplicate.
    Pass `idempotency_key` to keep that guarantee across processes (a ticket id, say).
    """

    def __init__(self, base_url: str, timeout_s: float = 60.0, api_key: str | None = None, retries: int = 3) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> UispsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
        """Poll /readyz until the database and broker are reachable."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not alive():
                raise ServiceError("the server process exited during start-up")
            try:
                if self.http.get("/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise ServiceError(f"the service at {self.http.base_url} was not ready within {timeout_s:.0f} s")

    def create_model(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create("/models", 201, idempotency_key, json=spec)

    def upload_version(
        self, model_id: str, checkpoint: bytes, filename: str = "model.safetensors", *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        files = {"file": (filename, checkpoint, "application/octet-stream")}
        return self._create(f"/models/{model_id}/versions", 201, idempotency_key, files=files)

    def get_version(self, model_id: str, version: int) -> dict[str, Any]:
        return self._json(self.http.get(f"/models/{model_id}/versions/{version}"), 200)

    def create_deletion_request(
        self,
        model_id: str,
        forget_labels: list[int],
        *,
        params: dict[str, Any] | None = None,
        base_version: int | None = None,
        external_ref: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": model_id, "forget_labels": forget_labels}
        if params:
            body["params"] = params
        optional = {"base_version": base_version, "external_ref": external_ref, "callback_url": callback_url}
        body |= {key: value for key, value in optional.items() if value is not None}
        return self._create("/deletion-requests", 202, idempotency_key, json=body)

    def get_certificate(self, request_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/deletion-requests/{request_id}/certificate"), 200)

    def certificate_key(self) -> bytes:
        response = self.http.get("/certificate-key")
        if response.status_code != 200:
            self._json(response, 200)
        return response.content

    def get_deletion_request(self, request_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/deletion-requests/{request_id}"), 200)

    def wait_for(
        self,
        request_id: str,
        *,
        timeout_s: float = 600.0,
        interval_s: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] = lambda _: None,
    ) -> dict[str, Any]:
        """Poll a deletion request until it is succeeded, failed or cancelled."""
        deadline = time.monotonic() + timeout_s
        while True:
            request = self.get_deletion_request(request_id)
            on_update(request)
            if request["state"] in TERMINAL_STATES:
                return request
            if time.monotonic() > deadline:
                raise ServiceError(f"deletion request {request_id} still {request['state']} after {timeout_s:.0f} s")
            time.sleep(interval_s)

    def download_checkpoint(self, model_id: str, version: int) -> VerifiedCheckpoint:
        """Download a checkpoint and check its sha256 against the headers and the version resource."""
        response = self.http.get(f"/models/{model_id}/versions/{version}/checkpoint")
        if response.status_code != 200:
            self._json(response, 200)
        actual = hashlib.sha256(response.content).hexdigest()
        claimed = response.headers.get("X-Checkpoint-SHA256")
        recorded = self.get_version(model_id, version)["sha256"]
        repr_digest = response.headers.get("Repr-Digest", "")
        expected_digest = f"sha-256=:{base64.b64encode(bytes.fromhex(actual)).decode()}:"
        if not (actual == claimed == recorded) or repr_digest != expected_digest:
            raise ServiceError(
                f"checkpoint of version {version} hashes to {actual}; header says {claimed}, "
                f"Repr-Digest {repr_digest!r}, version resource {recorded}"
            )
        return VerifiedCheckpoint(response.content, actual)

    def purge_checkpoint(self, model_id: str, version: int) -> dict[str, Any]:
        """Erase a version's checkpoint for good; returns the version, which records when."""
        response = self.http.delete(f"/models/{model_id}/versions/{version}/checkpoint")
        if response.status_code != 204:
            self._json(response, 204)
        return self.get_version(model_id, version)

    def _create(self, path: str, expected_status: int, idempotency_key: str | None, **request: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.post(path, headers=headers, **request)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(_backoff_s(attempt))
                continue
            if not last and _worth_retrying(response):
                time.sleep(_retry_after_s(response, attempt))
                continue
            return self._json(response, expected_status)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, response: httpx.Response, expected_status: int) -> dict[str, Any]:
        if response.status_code != expected_status:
            raise ServiceError(_describe_error(response))
        return response.json()


def _backoff_s(attempt: int) -> float:
    return min(0.5 * 2**attempt, 8.0)


def _worth_retrying(response: httpx.Response) -> bool:
    if response.status_code == 503:
        return True
    if response.status_code == 409 and "json" in response.headers.get("content-type", ""):
        return response.json().get("code") == "idempotency_key_in_use"
    return False


def _retry_after_s(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "")), 30.0)
    except ValueError:
        return _backoff_s(attempt)


def _describe_error(response: httpx.Response) -> str:
    try:
        problem = response.json()
        detail = f"{problem.get('code', '')}: {problem.get('detail', '')}"
    except ValueError:
        detail = response.text[:200]
    return f"{response.request.method} {response.request.url.path} -> {response.status_code} {detail}"
