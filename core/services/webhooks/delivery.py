"""One POST of a webhook event, made safely: the URL is checked again against the settings, the host
is resolved and every address it resolves to must be public (unless allowed), the connection goes to
the address that was checked (never resolved a second time), and redirects are not followed.

An attempt has one deadline, `webhook_timeout_s`, for all of it: connecting (to each address tried),
the TLS handshake, sending, the status line and headers, and the (capped) read of the body. Every
socket operation may wait only for what is left of it, so a receiver that answers a byte at a time
fails the attempt at the deadline (the socket is closed; the event is tried again later) instead of
holding a sender thread for as long as it keeps dripping."""

from __future__ import annotations

import functools
import http.client
import io
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from core.services.webhooks.signing import signing_keys, webhook_headers
from core.services.webhooks.urls import (
    CallbackTarget,
    InvalidCallbackUrl,
    IPAddress,
    RefusedAddress,
    parse_callback_url,
    resolve,
)
from core.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "uisps-webhooks/1"
MAX_ADDRESSES_TRIED = 3
ERROR_LIMIT = 500
# Only the status matters; a little of the body is read so as not to reset a receiver still writing it.
RESPONSE_BODY_LIMIT = 1024
UNREACHABLE_HOST = "the host does not resolve (now) to an address webhooks may reach"


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None  # the receiver's answer; None when none came
    error: str | None
    # Retrying cannot help: the URL or its addresses are not allowed.
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_event(
    url: str, message_id: str, body: bytes, settings: Settings, tenant_id: str,
    secret_generations: Sequence[int] = (0,),
) -> AttemptResult:
    """Sign `body` now with the tenant's secrets of `secret_generations` (the timestamp is part of
    the signature) and POST it once."""
    if settings.webhook_secret is None:
        return AttemptResult(None, "UISPS_WEBHOOK_SECRET is not set on this worker")
    try:
        # Again at send time: the allowed hosts and schemes may have changed since the request.
        target = parse_callback_url(url, settings)
        addresses = resolve(target, allow_private=settings.webhook_allow_private_addresses)
    except InvalidCallbackUrl as exc:
        return AttemptResult(None, f"refused: {exc}"[:ERROR_LIMIT], permanent=True)
    # The attempt's error is shown to the tenant's keys. A name that does not resolve and one that
    # resolves to an address webhooks may not reach get the same words and the same retries, or a
    # key could learn which names exist inside the operator's network (and, with details, what they
    # resolve to). The worker's log tells them apart. Both are retried: DNS can fail for a while,
    # and a name can move to a public address.
    except (RefusedAddress, OSError) as exc:  # OSError: socket.gaierror, the name does not resolve (now)
        log.warning("webhook host of %s cannot be used: %s", url, exc)
        return AttemptResult(None, UNREACHABLE_HOST)
    keys = signing_keys(settings.webhook_service_secrets, tenant_id, secret_generations)
    headers = {**webhook_headers(keys, message_id, int(time.time()), body), "user-agent": USER_AGENT}
    try:
        status, location = _post(target, addresses, headers, body, settings.webhook_timeout_s)
    except TimeoutError:
        return AttemptResult(None, f"no answer within {settings.webhook_timeout_s:g} s")
    except (OSError, http.client.HTTPException) as exc:  # the text can quote what the receiver sent
        return AttemptResult(None, _stored_text(f"{type(exc).__name__}: {exc}"))
    if 200 <= status < 300:
        return AttemptResult(status, None)
    if 300 <= status < 400:
        return AttemptResult(status, _stored_text(f"HTTP {status}: redirects are not followed (Location: {location})"))
    return AttemptResult(status, f"HTTP {status}")


def _stored_text(text: str) -> str:
    """`text` as an attempt's error can hold it: the receiver chooses some of it (a Location, a
    status line), and PostgreSQL's text refuses NUL; control characters are written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:ERROR_LIMIT]


def _post(
    target: CallbackTarget, addresses: list[IPAddress], headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int, str | None]:
    deadline = _Deadline(timeout)
    tried = addresses[:MAX_ADDRESSES_TRIED]
    last_error: OSError | None = None
    for index, address in enumerate(tried):
        # The addresses left share what is left of the deadline: one that drops the connection
        # attempt does not use it all up before the next is tried. TimeoutError once it has passed.
        connect_timeout = deadline.remaining() / (len(tried) - index)
        connection = _connection(target, address, deadline)
        try:
            try:
                connection.connect(connect_timeout)
            except OSError as exc:  # try the host's next address
                last_error = exc
                continue
            connection.request("POST", target.target, body=body, headers=headers)
            with connection.getresponse() as response:
                response.read(RESPONSE_BODY_LIMIT)  # what the receiver said is not used; don't hold its connection
                return response.status, response.getheader("location")
        finally:
            connection.close()
    assert last_error is not None
    raise last_error


class _Deadline:
    """The end of one attempt, on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left (> 0), the timeout for the next socket operation; TimeoutError when none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the attempt's deadline has passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """The response's socket, read with a timeout of what is left of the deadline at each read
    (http.client reads the status line and headers a line at a time, each line in as many reads as
    the receiver sends pieces: a timeout per read alone never ends a receiver that drips)."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        # As http.client's own reader: it keeps the socket open until the response is closed.
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int | None:  # type: ignore[override]
        self._sock.settimeout(self._deadline.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: object, deadline: _Deadline, **kwargs: object) -> None:
        super().__init__(sock, *args, **kwargs)  # type: ignore[arg-type]
        self.fp.close()  # http.client's reader, replaced before anything is read
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


def _connection(target: CallbackTarget, address: IPAddress, deadline: _Deadline) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target.host, target.port, str(address), deadline)
    return _PinnedHTTPConnection(target.host, target.port, str(address), deadline)


class _DeadlineConnection(http.client.HTTPConnection):
    """Sends, and reads the response, within what is left of the attempt's deadline."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline, **kwargs: object) -> None:
        super().__init__(host, port, timeout=deadline.remaining(), **kwargs)  # type: ignore[arg-type]
        self._address = address
        self._deadline = deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)  # type: ignore[assignment]

    def send(self, data: object) -> None:  # type: ignore[override]
        if self.sock is None or not isinstance(data, bytes):
            super().send(data)  # type: ignore[arg-type]  # (not the case here: headers and body are bytes)
            return
        view = memoryview(data)
        while view:  # each piece within what is left (an SSL socket's sendall waits per piece)
            self.sock.settimeout(self._deadline.remaining())
            view = view[self.sock.send(view):]

    def _open_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self._address, self.port), self._deadline.remaining() if timeout is None else timeout
        )


class _PinnedHTTPConnection(_DeadlineConnection):
    """Connects to the address that was checked; the Host header still names the host."""

    def connect(self, timeout: float | None = None) -> None:
        self.sock = self._open_socket(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    """As above, with TLS: the certificate must be valid for the host name (SNI and verification)."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline) -> None:
        super().__init__(host, port, address, deadline, context=ssl.create_default_context())

    def connect(self, timeout: float | None = None) -> None:
        sock = self._open_socket(timeout)
        try:
            sock.settimeout(self._deadline.remaining())  # the whole handshake, not each of its reads
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        except BaseException:
            sock.close()
            raise
