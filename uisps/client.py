"""A small client of the service's HTTP API (used by `uisps demo` and the end-to-end tests)."""

from __future__ import annotations

import base64
import hashlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


# A gateway that lost the service, or the service itself busy or without its database: worth
# sending the same request again, after Retry-After where there is one.
TRANSIENT_STATUSES = (502, 503, 504)


class ServiceError(Exception):
    """The service answered with an error (its problem+json detail) or not at all. `status` and
    `code` are the answer's, `retry_after_s` its Retry-After, where it sent them; `transient`: no
    answer, or a 502/503/504, so the same request may well succeed later."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None,
        retry_after_s: float | None = None, transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after_s, self.transient = status, code, retry_after_s, transient


@dataclass(frozen=True)
class VerifiedCheckpoint:
    data: bytes
    sha256: str


class UispsClient:
    """Sends `api_key` as a bearer token, and an Idempotency-Key with every POST that creates.

    A create whose answer was lost (connection dropped, timeout) or that met a 502, 503 or 504 is
    sent again with the same key, up to `retries` times (reads too, without a key); one that meets
    its twin still in flight (409 idempotency_key_in_use) is sent again until `timeout_s` has
    passed. The service then answers with what the first one did, never a duplicate. When the
    client gives up, the error names the key: pass it as `idempotency_key` to try again safely,
    from this process or another.
    """

    def __init__(self, base_url: str, timeout_s: float = 60.0, api_key: str | None = None, retries: int = 3) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)
        self.timeout_s = timeout_s
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
        return self._json(self._get(f"/models/{model_id}/versions/{version}"), 200)

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
        return self._json(self._get(f"/deletion-requests/{request_id}/certificate"), 200)

    def certificate_key(self) -> bytes:
        response = self._get("/certificate-key")
        if response.status_code != 200:
            self._json(response, 200)
        return response.content

    def webhook_secret(self) -> str:
        """The `whsec_` secret this tenant's webhook events are signed with (role compliance or admin)."""
        return str(self._json(self._get("/webhook-secret"), 200)["secret"])

    def get_deletion_request(self, request_id: str) -> dict[str, Any]:
        return self._json(self._get(f"/deletion-requests/{request_id}"), 200)

    def wait_for(
        self,
        request_id: str,
        *,
        timeout_s: float = 600.0,
        interval_s: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] = lambda _: None,
        alive: Callable[[], bool] = lambda: True,
    ) -> dict[str, Any]:
        """Poll a deletion request until it is succeeded, failed or cancelled. The service out of
        reach or answering 502/503/504 (a database restart, a deploy), or 429 (polls of many
        requests on one API key), is waited out until `timeout_s`, as long as its Retry-After says,
        unless `alive()` says the server process is gone; other errors end the wait at once. Each
        poll is one try, bounded by the time left."""
        deadline = time.monotonic() + timeout_s
        path = f"/deletion-requests/{request_id}"
        while True:
            try:
                request = self._json(self._get(path, retries=0, timeout_s=max(deadline - time.monotonic(), 1.0)), 200)
            except ServiceError as exc:
                left = deadline - time.monotonic()
                if not (exc.transient or exc.status == 429) or left <= 0:
                    raise
                if not alive():
                    raise ServiceError(f"the server process exited while {request_id} was polled ({exc})") from exc
                time.sleep(min(left, max(interval_s, exc.retry_after_s or 0.0)))
                continue
            on_update(request)
            if request["state"] in TERMINAL_STATES:
                return request
            if time.monotonic() > deadline:
                raise ServiceError(f"deletion request {request_id} still {request['state']} after {timeout_s:.0f} s")
            time.sleep(interval_s)

    def download_checkpoint(self, model_id: str, version: int) -> VerifiedCheckpoint:
        """Download a checkpoint and check its sha256 against the headers and the version resource."""
        response = self._get(f"/models/{model_id}/versions/{version}/checkpoint")
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
        """Erase a version's checkpoint for good; returns the version, which records when. A purge
        is idempotent (a second one answers 204 too), so it is sent again like a read."""
        response = self._send("DELETE", f"/models/{model_id}/versions/{version}/checkpoint")
        if response.status_code != 204:
            self._json(response, 204)
        return self.get_version(model_id, version)

    def _create(self, path: str, expected_status: int, idempotency_key: str | None, **request: Any) -> dict[str, Any]:
        key = idempotency_key or str(uuid.uuid4())
        response = self._send("POST", path, key=key, headers={"Idempotency-Key": key}, **request)
        return self._json(response, expected_status)

    def _get(self, path: str, retries: int | None = None, timeout_s: float | None = None) -> httpx.Response:
        timeout = {} if timeout_s is None else {"timeout": min(timeout_s, self.timeout_s)}
        return self._send("GET", path, retries=retries, **timeout)

    def _send(
        self, method: str, path: str, *, retries: int | None = None, key: str | None = None, **request: Any
    ) -> httpx.Response:
        """One request, sent again after a lost answer or a 502/503/504, up to `retries` times
        (the client's by default). A create (`key`: its Idempotency-Key) that meets its twin still
        in flight (a large upload being checked) waits for it as long as a request may take, from
        the first time it is met; when a create gives up, the error names the key."""
        retries = self.retries if retries is None else retries
        again = (f"; send it again with idempotency_key={key!r} to get the first one's answer, never a duplicate"
                 if key is not None else "")
        send = getattr(self.http, method.lower())  # get, post, delete
        in_flight_until: float | None = None
        failures = 0
        while True:
            try:
                response = send(path, **request)
            except (httpx.UnsupportedProtocol, httpx.ProxyError) as exc:  # the client's setup: no retry mends it
                raise ServiceError(f"{method} {path}: {type(exc).__name__}: {exc} (is base_url http(s)://host:port?)") from exc
            except httpx.TransportError as exc:
                failures += 1
                if failures > retries:
                    raise ServiceError(
                        f"{method} {path}: no answer after {failures} tries ({type(exc).__name__}: {exc}){again}",
                        transient=True,
                    ) from exc
                time.sleep(_backoff_s(failures))
                continue
            in_flight = key is not None and _in_flight(response)
            if in_flight and in_flight_until is None:
                in_flight_until = time.monotonic() + self.timeout_s
            if response.status_code in TRANSIENT_STATUSES and failures < retries:
                failures += 1
                time.sleep(_retry_after_s(response, failures))
                continue
            if in_flight and in_flight_until is not None and time.monotonic() < in_flight_until:
                time.sleep(_retry_after_s(response, 1))
                continue
            if key is not None and (in_flight or response.status_code in TRANSIENT_STATUSES):
                # (a 502/504 may have come from a gateway after the service did create it)
                raise _error(response, f" (Idempotency-Key {key}: send it again with this key)")
            return response

    def _json(self, response: httpx.Response, expected_status: int) -> dict[str, Any]:
        if response.status_code != expected_status:
            raise _error(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ServiceError(
                f"{response.request.method} {response.request.url.path} -> {response.status_code}, "
                f"but the body is not a JSON object: {response.text[:200]!r}",
                status=response.status_code,
            )
        return body


def _backoff_s(attempt: int) -> float:
    """0.5 s after the first failure, doubling, at most 8 s."""
    return min(0.5 * 2 ** (attempt - 1), 8.0)


def _in_flight(response: httpx.Response) -> bool:
    """The service is still working on the first request sent with this key."""
    return response.status_code == 409 and _problem(response).get("code") == "idempotency_key_in_use"


def _retry_after_s(response: httpx.Response, attempt: int) -> float:
    wait = _retry_after_header(response)
    return _backoff_s(attempt) if wait is None else wait


def _retry_after_header(response: httpx.Response) -> float | None:
    """Retry-After in seconds (0..30), or None where it is missing or not a number."""
    try:
        wait = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(wait, 0.0), 30.0) if math.isfinite(wait) else None


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(response: httpx.Response, suffix: str = "") -> ServiceError:
    problem = _problem(response)
    detail = f"{problem.get('code', '')}: {problem.get('detail', '')}" if problem else response.text[:200]
    code = problem.get("code")
    return ServiceError(
        f"{response.request.method} {response.request.url.path} -> {response.status_code} {detail}{suffix}",
        status=response.status_code, code=code if isinstance(code, str) else None,
        retry_after_s=_retry_after_header(response), transient=response.status_code in TRANSIENT_STATUSES,
    )
