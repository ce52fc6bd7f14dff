"""One webhook attempt (core.services.webhooks.delivery.post_event) against real TCP servers on
127.0.0.1: an attempt has one deadline, UISPS_WEBHOOK_TIMEOUT_S, however the receiver spreads out
its answer, and is then failed with its socket closed."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from standardwebhooks import Webhook

from core.services.webhooks import delivery
from core.services.webhooks.delivery import post_event
from core.services.webhooks.signing import tenant_secret
from core.settings import Settings

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
TIMEOUT_S = 2
BODY = b'{"type":"deletion_request.succeeded"}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def _settings() -> Settings:
    return Settings(
        webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1", webhook_allow_http=True,
        webhook_allow_private_addresses=True, webhook_timeout_s=TIMEOUT_S,
    )


class Receiver:
    """A TCP server on 127.0.0.1 that reads each connection's first bytes, then runs `answer` on it
    (which may take its time: it stops when the test ends, or when the client has closed)."""

    def __init__(self, answer: Callable[[Receiver, socket.socket], None], tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[bytes] = []
        self.client_closed = threading.Event()
        self.done = threading.Event()
        self._answer = answer
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}/hook"

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(data)
        return body

    def drip(self, conn: socket.socket, data: bytes, every_s: float) -> None:
        """Send `data` a byte at a time, `every_s` apart, until the client closes the connection."""
        for byte in data:
            if self.closed_by_client(conn, wait_s=every_s):
                return
            conn.sendall(bytes([byte]))
        self.closed_by_client(conn, wait_s=10)

    def closed_by_client(self, conn: socket.socket, wait_s: float) -> bool:
        if self.done.is_set() or not select.select([conn], [], [], wait_s)[0]:
            return self.done.is_set()
        try:
            if conn.recv(65536):  # the request was read: nothing more comes before the close
                return False
        except ConnectionResetError:
            pass
        self.client_closed.set()
        return True

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    if self._tls is not None:
                        conn = self._tls.wrap_socket(conn, server_side=True)
                    self._answer(self, conn)
                except OSError:
                    self.client_closed.set()  # the client reset the connection

    def close(self) -> None:
        self.done.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
def trusted_tls(tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context whose certificate the sender trusts (in place of the system's CAs)."""
    cert, key = tls_files
    default_context = ssl.create_default_context
    monkeypatch.setattr(delivery.ssl, "create_default_context", lambda: default_context(cafile=str(cert)))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server


@pytest.fixture
def serve() -> Iterator[Callable[..., Receiver]]:
    receivers: list[Receiver] = []

    def start(answer: Callable[[Receiver, socket.socket], None], tls: ssl.SSLContext | None = None) -> Receiver:
        receivers.append(Receiver(answer, tls))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.close()


def _timed_post(url: str) -> tuple[float, object]:
    started = time.monotonic()
    result = post_event(url, "msg_1", BODY, _settings(), "default")
    return time.monotonic() - started, result


def _drips_the_status_line(receiver: Receiver, conn: socket.socket) -> None:
    receiver.read_request(conn)
    receiver.drip(conn, ANSWER, every_s=0.5)  # ~19 s in all; no single wait near the timeout


def _drips_the_body(receiver: Receiver, conn: socket.socket) -> None:
    receiver.read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
    receiver.drip(conn, b"x" * 40, every_s=0.5)


def _says_nothing(receiver: Receiver, conn: socket.socket) -> None:
    receiver.read_request(conn)
    receiver.closed_by_client(conn, wait_s=10)


def _drips_the_tls_handshake(receiver: Receiver, conn: socket.socket) -> None:
    conn.recv(65536)  # the ClientHello
    # A handshake record of 64 bytes, a byte at a time: the client waits for the whole record.
    receiver.drip(conn, b"\x16\x03\x03\x00\x40" + bytes(64), every_s=0.5)


@pytest.mark.parametrize(
    ("answer", "scheme"),
    [
        (_drips_the_status_line, "http"),
        (_drips_the_body, "http"),
        (_says_nothing, "http"),
        (_drips_the_tls_handshake, "https"),
    ],
    ids=["status-line", "body", "silent", "tls-handshake"],
)
def test_a_slow_receiver_fails_the_attempt_at_its_deadline(serve, answer, scheme: str) -> None:  # noqa: ANN001
    receiver = serve(answer)

    elapsed, result = _timed_post(receiver.url(scheme))

    # Each of its reads came well within the timeout; the attempt as a whole did not. The bound
    # leaves a loaded machine seconds, and is still far below the 19 s or more of the whole answer.
    assert elapsed < TIMEOUT_S + 2, f"the attempt took {elapsed:.2f} s"
    assert not result.delivered and result.status_code is None and not result.permanent  # tried again later
    assert result.error == f"no answer within {TIMEOUT_S:g} s"
    assert receiver.client_closed.wait(1), "the attempt's connection was left open"


def test_a_slow_receiver_over_tls_fails_the_attempt_at_its_deadline(serve, trusted_tls: ssl.SSLContext) -> None:  # noqa: ANN001
    receiver = serve(_drips_the_status_line, trusted_tls)

    elapsed, result = _timed_post(receiver.url("https"))

    assert elapsed < TIMEOUT_S + 2, f"the attempt took {elapsed:.2f} s"
    assert result.status_code is None and result.error == f"no answer within {TIMEOUT_S:g} s"
    assert receiver.client_closed.wait(1), "the attempt's connection was left open"
    assert receiver.requests  # the handshake and the request went through: the answer was too slow


def _answers_at_once(receiver: Receiver, conn: socket.socket) -> None:
    assert receiver.read_request(conn) == BODY
    conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_prompt_receiver_is_delivered(serve, trusted_tls: ssl.SSLContext, scheme: str) -> None:  # noqa: ANN001
    receiver = serve(_answers_at_once, trusted_tls if scheme == "https" else None)

    _, result = _timed_post(receiver.url(scheme))

    assert result.delivered and result.status_code == 204 and result.error is None
    head = receiver.requests[0].split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"post /hook http/1.1") and b"webhook-signature: v1," in head


def test_a_receiver_still_on_the_secret_from_the_previous_service_secret_accepts_the_event(serve) -> None:  # noqa: ANN001
    receiver = serve(_answers_at_once)
    new_service = "whsec_" + base64.b64encode(bytes(range(50, 82))).decode()
    replaced = _settings().model_copy(update={"webhook_secret": SecretStr(new_service)})
    replacing = replaced.model_copy(update={"webhook_secret_previous": SecretStr(SECRET)})

    assert post_event(receiver.url(), "msg_1", BODY, replacing, "acme").delivered
    assert post_event(receiver.url(), "msg_2", BODY, replaced, "acme").delivered

    with_previous, without = (_headers_of(request) for request in receiver.requests)
    old_tenant_secret = tenant_secret(SECRET, "acme")
    assert Webhook(old_tenant_secret).verify(BODY, with_previous)
    with pytest.raises(Exception, match="signature"):
        Webhook(old_tenant_secret).verify(BODY, without)
    assert Webhook(tenant_secret(new_service, "acme")).verify(BODY, without)


def _headers_of(request: bytes) -> dict[str, str]:
    head = request.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in head)}


def test_a_certificate_the_sender_does_not_trust_is_refused(serve, tls_files: tuple[Path, Path]) -> None:  # noqa: ANN001
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*tls_files)  # self-signed, and not among the system's CAs
    receiver = serve(_answers_at_once, server)

    _, result = _timed_post(receiver.url("https"))

    assert result.status_code is None and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert receiver.requests == []


def test_an_endless_body_is_read_only_up_to_a_small_cap(serve) -> None:  # noqa: ANN001

    def streams_forever(receiver: Receiver, conn: socket.socket) -> None:
        receiver.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")  # no length: the body runs to the close
        while not receiver.done.is_set():
            conn.send(b"x" * 65536)  # until the client closes (and resets) the connection

    receiver = serve(streams_forever)

    _, result = _timed_post(receiver.url())

    # Only the status matters: the attempt neither waits for the end of the body (which would run
    # past the deadline: not delivered) nor reads it all.
    assert result.delivered and result.status_code == 200
    assert receiver.client_closed.wait(1)


def test_an_unreachable_address_fails_without_waiting_for_the_deadline() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed

    _, result = _timed_post(f"http://127.0.0.1:{port}/hook")

    # refused, not retried until the deadline (which would read "no answer within ...")
    assert not result.delivered and result.status_code is None and "ConnectionRefused" in result.error


def test_what_a_receiver_sends_is_stored_without_control_characters(serve) -> None:  # noqa: ANN001
    # PostgreSQL's text refuses NUL: the attempt's error must be storable, or it is never recorded
    def redirects_oddly(receiver: Receiver, conn: socket.socket) -> None:
        receiver.read_request(conn)
        conn.sendall(b"HTTP/1.1 302 Found\r\nlocation: https://x/\x00y\x1b[31m\r\ncontent-length: 0\r\n\r\n")

    _, result = _timed_post(serve(redirects_oddly).url("http"))

    assert result.status_code == 302 and result.error.startswith("HTTP 302: redirects are not followed")
    assert result.error.isprintable() and "https://x/\\x00y\\x1b[31m" in result.error


def test_an_event_for_a_url_stored_before_the_ascii_check_fails_for_good_at_once(serve) -> None:  # noqa: ANN001
    # such a URL cannot be sent: refused by the send-time check of the URL, not raised in the sender
    receiver = serve(_answers_at_once)
    settings = _settings()

    result = post_event(receiver.url("http") + "/caf\u00e9", "msg_1", BODY, settings, "default")

    assert result.permanent and result.status_code is None and "path and query must be ASCII" in result.error
    assert receiver.requests == []
