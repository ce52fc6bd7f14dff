"""Signed deletion certificates: Ed25519 over the canonical JSON of what a deletion request did.

A certificate file is ``{"certificate": {...}, "signature": {"algorithm": "Ed25519", "key_id":
..., "value": <base64>}}``. The signature covers the UTF-8 bytes of the certificate object in
canonical JSON. Which canonical form is named by the certificate's own ``format``:

- 2 (issued now): RFC 8785, the JSON Canonicalization Scheme, which libraries implement in most
  languages, so anyone can check a certificate with the service's public key
  (``GET /certificate-keys``) and ``uisps certificate verify`` or a few lines of their own;
- 1 (issued before): Python's ``json.dumps(sort_keys=True, separators=(",", ":"),
  ensure_ascii=True)``, kept so that the files clients already hold still verify.

Ed25519 signatures are deterministic: the same request signed by the same key gives the same file.

The private key is a PEM file (PKCS#8, mode 0600) created on first use; every process that signs
must read the same file (``UISPS_CERTIFICATE_KEY_PATH``). ``rotate_signing_key`` replaces it and
keeps the old key's public half in the retired-keys folder (one ``<hex of key_id>.pem`` each), so
certificates it signed still verify. Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.errors import UisError
from core.settings import retired_keys_dir_beside

logger = logging.getLogger(__name__)

ALGORITHM = "Ed25519"
CERTIFICATE_TYPE = "uisps.deletion-certificate"
LEGACY_FORMAT = 1  # Python's json.dumps form
JCS_FORMAT = 2  # RFC 8785
CERTIFICATE_FORMAT = JCS_FORMAT  # what the service issues
# RFC 8785 numbers are IEEE doubles: integers beyond this would be rounded, so rfc8785 refuses them.
MAX_JCS_INTEGER = 2**53 - 1
KEY_ID_PATTERN = re.compile(r"sha256:([0-9a-f]{64})")

KeyStatus = Literal["active", "retired"]


class InvalidCertificate(UisError):
    code = "invalid_certificate"


class KeyFileError(UisError):
    code = "invalid_key_file"


def _python_canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


# The canonical form of each format. The format is read from the certificate object itself, which
# is inside the signed bytes: a document whose format was changed no longer matches its signature,
# so nobody can move a certificate to the other form without breaking it.
_CANONICAL_FORMS: dict[int, Callable[[Any], bytes]] = {LEGACY_FORMAT: _python_canonical, JCS_FORMAT: rfc8785.dumps}


def certificate_format(certificate: dict[str, Any]) -> int:
    """The format a certificate object names; InvalidCertificate when it is none we know."""
    value = certificate.get("format")
    # JSON has one number type: 2.0 is 2 (as JavaScript reads it), but true is not 1.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in _CANONICAL_FORMS:
        return int(value)
    known = ", ".join(map(str, _CANONICAL_FORMS))
    raise InvalidCertificate(f"unknown certificate format {value!r}: this version checks formats {known}")


def canonical_bytes(certificate: dict[str, Any]) -> bytes:
    """The bytes a certificate object's signature covers, in the canonical form of its format."""
    return _CANONICAL_FORMS[certificate_format(certificate)](certificate)


def fits_jcs(value: Any) -> bool:
    """Whether every integer in `value` survives RFC 8785 (an IEEE double holds it exactly)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_JCS_INTEGER
    if isinstance(value, dict):
        return all(fits_jcs(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(fits_jcs(item) for item in value)
    return True


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"the public key is not an {ALGORITHM} key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"signing key not found: {path}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an {ALGORITHM} private key")
    return key


def _write_temp(folder: Path, prefix: str, data: bytes, mode: int) -> Path:
    """`data` in a new file in `folder`, flushed to disk: ready to be linked or renamed into place."""
    fd, temp = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def _fsync_folder(folder: Path) -> None:
    # A rename or link is durable only once the folder's entry is: without this, a crash could
    # bring back the old signing key after certificates were signed with the new one.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, created (mode 0600) when missing; safe when processes race to create it."""
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _write_temp(path.parent, ".certificate-key-", _private_pem(Ed25519PrivateKey.generate()), 0o600)
    try:
        # link, unlike rename, refuses to replace: whoever links first wins and everyone
        # then reads the winner's key.
        os.link(temp, path)
        _fsync_folder(path.parent)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    return load_private_key(path)


# --- retired keys: the public halves of earlier signing keys ----------------------------------


def retired_key_file(retired_dir: Path, key_id_: str) -> Path:
    """Where the retired key `key_id_` is kept. The id comes from untrusted certificates, so only
    the exact form `sha256:<64 hex>` may become a file name (no path can be smuggled in)."""
    match = KEY_ID_PATTERN.fullmatch(key_id_) if isinstance(key_id_, str) else None
    if match is None:
        raise InvalidCertificate(f"the key id {key_id_!r} is not 'sha256:' followed by 64 hex digits")
    return Path(retired_dir) / f"{match.group(1)}.pem"


def retire_public_key(retired_dir: Path, public_key: Ed25519PublicKey) -> Path:
    """Keep `public_key` among the retired keys; the same key retired twice is one file."""
    retired_dir = Path(retired_dir)
    retired_dir.mkdir(parents=True, exist_ok=True)
    target = retired_key_file(retired_dir, key_id(public_key))
    temp = _write_temp(retired_dir, ".retiring-", public_key_pem(public_key), 0o644)
    try:
        os.replace(temp, target)  # the content is the key's, so replacing an earlier copy changes nothing
        _fsync_folder(retired_dir)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _load_retired_file(path: Path) -> Ed25519PublicKey:
    try:
        key = load_public_key_pem(path.read_bytes())
    except KeyFileError as exc:
        raise KeyFileError(f"retired key {path}: {exc}") from None
    if path.name != f"{key_id(key).removeprefix('sha256:')}.pem":
        # The name is how certificates find it: a key under another name would check the wrong files.
        raise KeyFileError(f"retired key {path} holds key {key_id(key)}, not the one its name says")
    return key


def load_retired_key(retired_dir: Path, key_id_: str) -> Ed25519PublicKey | None:
    """The retired key with this id, or None when there is none (never retired, or deleted)."""
    path = retired_key_file(retired_dir, key_id_)
    try:
        return _load_retired_file(path)
    except FileNotFoundError:
        return None


def load_retired_keys(retired_dir: Path) -> dict[str, Ed25519PublicKey]:
    """Every retired key by id (none when the folder does not exist yet)."""
    folder = Path(retired_dir)
    if not folder.is_dir():
        return {}
    keys = {}
    for path in sorted(folder.glob("*.pem")):
        if path.name.startswith("."):
            continue
        try:
            key = _load_retired_file(path)
        except (KeyFileError, OSError) as exc:
            # One misnamed or unreadable file must not hide every other key; checking a
            # certificate by its key id (load_retired_key) still refuses it, with the reason.
            logger.error("retired certificate key skipped: %s", exc)
            continue
        keys[key_id(key)] = key
    return keys


# --- rotation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRotation:
    retired_key_id: str
    retired_file: Path
    new_key_id: str


@contextmanager
def _rotation_lock(path: Path) -> Iterator[None]:
    # Rotations replace the key file, so two at once must not both read the same old key: the
    # second would replace the first's new key without retiring it, and any certificate signed by
    # that key in between would check against nothing.
    lock = path.parent / f".{path.name}.lock"
    with lock.open("a") as stream:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(stream.fileno(), fcntl.LOCK_UN)


def rotate_signing_key(path: Path, retired_dir: Path) -> KeyRotation:
    """Retire the signing key at `path` (its public half into `retired_dir`) and put a new one there.

    The old key is retired before it is replaced, so a key that signed something is always either
    the active key or a retired one. The new key replaces the file in one rename: a process reading
    the file sees the old key or the new one, never none (so it never creates a third). Racing
    rotations take turns (a lock file beside the key); first creation still races through
    `os.link` (load_or_create_private_key) and never meets a rotation, which needs a key to exist.
    """
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"there is no signing key at {path} to rotate (one is created on first use)")
    with _rotation_lock(path):
        old = load_private_key(path).public_key()
        retired_file = retire_public_key(retired_dir, old)
        new = Ed25519PrivateKey.generate()
        temp = _write_temp(path.parent, ".certificate-key-", _private_pem(new), 0o600)
        try:
            os.replace(temp, path)
            _fsync_folder(path.parent)
        finally:
            temp.unlink(missing_ok=True)
    return KeyRotation(key_id(old), retired_file, key_id(new.public_key()))


# --- signing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One key, with its id and public half: a signature and the key_id it names come from one of these."""

    private_key: Ed25519PrivateKey
    key_id: str
    public_key_pem: bytes

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        public = private_key.public_key()
        return cls(private_key, key_id(public), public_key_pem(public))


@dataclass(frozen=True)
class PublishedKey:
    key_id: str
    public_key_pem: bytes
    status: KeyStatus


def _file_identity(path: Path) -> tuple[int, ...] | None:
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return (found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size)


class Signer:
    """Signs certificates with the key at `path`, loading (or creating) it on first use.

    The key is cached, but the file is looked at (one stat) each time the key is used: a rotation
    (a new file renamed into place, another inode) is picked up by every process at its next
    signature, with no restart.
    """

    def __init__(self, path: Path, retired_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.retired_dir = Path(retired_dir) if retired_dir is not None else retired_keys_dir_beside(self.path)
        self._key: SigningKey | None = None
        self._identity: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    def active(self) -> SigningKey:
        with self._lock:
            # Looked at before the read: if the file changes during it, the next call sees another
            # identity and reads again, so a stale key is never kept.
            identity = _file_identity(self.path)
            if self._key is None:
                # Only the first use may create the key: a key that went missing later (an `rm`
                # before a restore, a half-done copy) must not be replaced by a new one nobody
                # retires, whose certificates would then check against nothing.
                self._key = SigningKey.of(load_or_create_private_key(self.path))
                # the identity from before the read, as below (None for a key created just now,
                # which the next use therefore reads again: a rotation may follow at once)
                self._identity = identity
            elif identity is None:
                raise KeyFileError(f"the signing key {self.path} is missing; restore it (it is not created again)")
            elif identity != self._identity:
                self._key = SigningKey.of(load_private_key(self.path))
                self._identity = identity
            return self._key

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self.active().private_key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return self.active().key_id

    def public_key_pem(self) -> bytes:
        return self.active().public_key_pem

    def published_keys(self) -> list[PublishedKey]:
        """The active key, then the retired ones (by id): what checks certificates of this service."""
        active = self.active()
        keys = [PublishedKey(active.key_id, active.public_key_pem, "active")]
        for id_, key in sorted(load_retired_keys(self.retired_dir).items()):
            if id_ != active.key_id:  # a retired key made active again is listed once, as active
                keys.append(PublishedKey(id_, public_key_pem(key), "retired"))
        return keys

    def sign(self, certificate: dict[str, Any]) -> dict[str, Any]:
        key = self.active()
        signature = key.private_key.sign(canonical_bytes(certificate))
        return {
            "certificate": certificate,
            "signature": {
                "algorithm": ALGORITHM,
                "key_id": key.key_id,
                "value": base64.b64encode(signature).decode("ascii"),
            },
        }


# --- verification ---------------------------------------------------------------------------------


def parse_certificate(text: str) -> Any:
    """A certificate file's JSON, refusing a name given twice in one object (RFC 8785 assumes
    I-JSON, which forbids it): JSON parsers keep the first or the last, so a reader could see
    other values than the ones that were checked. json.JSONDecodeError for a file that is not JSON."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise InvalidCertificate(f"the file names {', '.join(map(repr, twice))} twice in one object: "
                                     "a reader could see either value")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


def _signature_of(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("certificate"), dict):
        raise InvalidCertificate("not a certificate: expected an object with 'certificate' and 'signature'")
    signature = document.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise InvalidCertificate(f"the signature is missing or not {ALGORITHM}")
    unsigned = sorted(set(document) - {"certificate", "signature"}) + sorted(
        f"signature.{name}" for name in set(signature) - {"algorithm", "key_id", "value"})
    if unsigned:  # text beside the signed object could be read as part of what was certified
        raise InvalidCertificate(f"members outside what was signed: {', '.join(unsigned)}")
    return signature


def verify_certificate(document: Any, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check a certificate document; returns its certificate object or raises InvalidCertificate."""
    signature = _signature_of(document)
    expected_id = key_id(public_key)
    if signature.get("key_id") != expected_id:
        raise InvalidCertificate(
            f"signed by key {signature.get('key_id')}, not by the given public key {expected_id}"
        )
    try:
        raw = base64.b64decode(str(signature.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCertificate("the signature value is not base64") from None
    certificate = document["certificate"]
    try:
        public_key.verify(raw, canonical_bytes(certificate))
    except InvalidSignature:
        raise InvalidCertificate("the signature does not match the certificate: it was altered or not signed by this key") from None
    except ValueError as exc:  # NaN, an integer RFC 8785 cannot hold, a lone surrogate: a forged document
        raise InvalidCertificate(f"the certificate cannot be checked: {exc}") from None
    if certificate.get("type") != CERTIFICATE_TYPE:
        raise InvalidCertificate(f"not a {CERTIFICATE_TYPE} (type is {certificate.get('type')!r})")
    return certificate


def verify_with_service_keys(document: Any, key_path: Path, retired_dir: Path) -> tuple[dict[str, Any], KeyStatus]:
    """Check a certificate against this service's keys, the one at `key_path` (active) or a retired
    one, chosen by the signature's key_id; returns the certificate object and which it was."""
    wanted = _signature_of(document).get("key_id")
    key_path, retired_dir = Path(key_path), Path(retired_dir)
    if not key_path.exists() and not retired_dir.is_dir():
        raise KeyFileError(f"signing key not found: {key_path} (and no retired keys in {retired_dir})")
    if key_path.exists():
        active = load_private_key(key_path).public_key()
        if key_id(active) == wanted:
            return verify_certificate(document, active), "active"
    retired = load_retired_key(retired_dir, wanted)
    if retired is None:
        raise InvalidCertificate(
            f"signed by key {wanted}, which is neither this service's signing key ({key_path}) nor one of "
            f"its retired keys ({retired_dir}): a retired key deleted after a leak, or another service's key"
        )
    return verify_certificate(document, retired), "retired"
