"""One POST of a webhook event, made safely: the URL is checked again against the settings, the host
is resolved and every address it resolves to must be public (unless allowed), the connection goes to
the address that was checked (never resolved a second time), and redirects are not followed."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass

from core.services.webhooks.signing import signing_key, webhook_headers
from core.services.webhooks.urls import (
    CallbackTarget,
    InvalidCallbackUrl,
    IPAddress,
    RefusedAddress,
    parse_callback_url,
    resolve,
)
from core.settings import Settings

USER_AGENT = "uisps-webhooks/1"
MAX_ADDRESSES_TRIED = 3
ERROR_LIMIT = 500


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None  # the receiver's answer; None when none came
    error: str | None
    # Retrying cannot help: the URL or its addresses are not allowed.
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_event(url: str, message_id: str, body: bytes, settings: Settings) -> AttemptResult:
    """Sign `body` now (the timestamp is part of the signature) and POST it once."""
    if settings.webhook_secret is None:
        return AttemptResult(None, "UISPS_WEBHOOK_SECRET is not set on this worker")
    try:
        # Again at send time: the allowed hosts and schemes may have changed since the request.
        target = parse_callback_url(url, settings)
        addresses = resolve(target, allow_private=settings.webhook_allow_private_addresses)
    except (InvalidCallbackUrl, RefusedAddress) as exc:
        return AttemptResult(None, f"refused: {exc}"[:ERROR_LIMIT], permanent=True)
    except OSError as exc:  # socket.gaierror: the name does not resolve (now)
        return AttemptResult(None, f"cannot resolve {target.host}: {exc}"[:ERROR_LIMIT])
    key = signing_key(settings.webhook_secret.get_secret_value())
    headers = {**webhook_headers(key, message_id, int(time.time()), body), "user-agent": USER_AGENT}
    try:
        status, location = _post(target, addresses, headers, body, settings.webhook_timeout_s)
    except TimeoutError:
        return AttemptResult(None, f"no answer within {settings.webhook_timeout_s:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT])
    if 200 <= status < 300:
        return AttemptResult(status, None)
    if 300 <= status < 400:
        return AttemptResult(status, f"HTTP {status}: redirects are not followed (Location: {location})"[:ERROR_LIMIT])
    return AttemptResult(status, f"HTTP {status}")


def _post(
    target: CallbackTarget, addresses: list[IPAddress], headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int, str | None]:
    last_error: OSError | None = None
    for address in addresses[:MAX_ADDRESSES_TRIED]:
        connection = _connection(target, address, timeout)
        try:
            try:
                connection.connect()
            except OSError as exc:  # try the host's next address
                last_error = exc
                continue
            connection.request("POST", target.target, body=body, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)  # what the receiver said is not used; don't hold its connection
            return response.status, response.getheader("location")
        finally:
            connection.close()
    assert last_error is not None
    raise last_error


def _connection(target: CallbackTarget, address: IPAddress, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target.host, target.port, str(address), timeout)
    return _PinnedHTTPConnection(target.host, target.port, str(address), timeout)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS: the certificate must be valid for the host name (SNI and verification)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
