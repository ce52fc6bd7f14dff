"""Signed deletion certificates: Ed25519 over the canonical JSON of what a deletion request did.

A certificate file is ``{"certificate": {...}, "signature": {"algorithm": "Ed25519", "key_id":
..., "value": <base64>}}``. The signature covers the UTF-8 bytes of the certificate object in
canonical JSON (keys sorted, no whitespace, ASCII only, no NaN), so anyone can check it with the
service's public key (``GET /certificate-key``) and ``uisps certificate verify`` or a few lines in
any language. Ed25519 signatures are deterministic: the same request signed by the same key gives
the same file every time.

The private key is a PEM file (PKCS#8, mode 0600) created on first use; every process that signs
must read the same file (``UISPS_CERTIFICATE_KEY_PATH``). Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.errors import UisError

ALGORITHM = "Ed25519"
CERTIFICATE_TYPE = "uisps.deletion-certificate"
CERTIFICATE_FORMAT = 1


class InvalidCertificate(UisError):
    code = "invalid_certificate"


class KeyFileError(UisError):
    code = "invalid_key_file"


def canonical_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


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


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, created (mode 0600) when missing; safe when processes race to create it."""
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, temp = tempfile.mkstemp(prefix=".certificate-key-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(pem)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            # link, unlike rename, refuses to replace: whoever links first wins and everyone
            # then reads the winner's key.
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        Path(temp).unlink(missing_ok=True)
    return load_private_key(path)


class Signer:
    """Signs certificates with the key at `path`, loading (or creating) it on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    @property
    def private_key(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_private_key(self.path)
            return self._key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def public_key_pem(self) -> bytes:
        return public_key_pem(self.public_key)

    def sign(self, certificate: dict[str, Any]) -> dict[str, Any]:
        signature = self.private_key.sign(canonical_bytes(certificate))
        return {
            "certificate": certificate,
            "signature": {
                "algorithm": ALGORITHM,
                "key_id": self.key_id,
                "value": base64.b64encode(signature).decode("ascii"),
            },
        }


def verify_certificate(document: Any, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check a certificate document; returns its certificate object or raises InvalidCertificate."""
    if not isinstance(document, dict) or not isinstance(document.get("certificate"), dict):
        raise InvalidCertificate("not a certificate: expected an object with 'certificate' and 'signature'")
    signature = document.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        raise InvalidCertificate(f"the signature is missing or not {ALGORITHM}")
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
    except ValueError as exc:  # NaN in a forged document, say
        raise InvalidCertificate(f"the certificate cannot be checked: {exc}") from None
    if certificate.get("type") != CERTIFICATE_TYPE:
        raise InvalidCertificate(f"not a {CERTIFICATE_TYPE} (type is {certificate.get('type')!r})")
    return certificate
