"""Certificate formats (RFC 8785 now, Python's json.dumps form before) and signing-key rotation."""

from __future__ import annotations

import base64
import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core import certificates
from core.certificates import (
    CERTIFICATE_TYPE,
    InvalidCertificate,
    KeyFileError,
    Signer,
    key_id,
    load_retired_keys,
    retired_key_file,
    rotate_signing_key,
    verify_certificate,
    verify_with_service_keys,
)

# What Python and other languages write differently: 100.0 (JavaScript and Go print 100),
# 1e-05, -0.0, non-ASCII (escaped by the old form, UTF-8 in RFC 8785), keys outside the BMP.
FACTS: dict[str, Any] = {
    "type": CERTIFICATE_TYPE,
    "request_id": "r-1",
    "external_ref": "Löschung „Art. 17\" 😀",
    "metrics": {"after": {"acc_forget": 100.0, "mia": 1e-05, "delta": -0.0}, "😀": 1, "\uff01": 2},
    "new_checkpoint": {"version": 2, "size_bytes": 2**53 - 1},
}


def _certificate(format_: Any) -> dict[str, Any]:
    return {**copy.deepcopy(FACTS), "format": format_}


def _signature(document: dict[str, Any]) -> bytes:
    return base64.b64decode(document["signature"]["value"])


def _document(key: Ed25519PrivateKey, certificate: dict[str, Any], signed: bytes) -> dict[str, Any]:
    return {
        "certificate": certificate,
        "signature": {
            "algorithm": "Ed25519",
            "key_id": key_id(key.public_key()),
            "value": base64.b64encode(key.sign(signed)).decode(),
        },
    }


def _signed_the_old_way(key: Ed25519PrivateKey, certificate: dict[str, Any]) -> dict[str, Any]:
    """A certificate as the service issued them before format 2: over Python's json.dumps form."""
    signed = json.dumps(certificate, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return _document(key, certificate, signed.encode())


def _signed_by_another_jcs_implementation(key: Ed25519PrivateKey, certificate: dict[str, Any]) -> dict[str, Any]:
    return _document(key, certificate, rfc8785.dumps(certificate))


def test_a_format_2_certificate_is_signed_over_its_rfc8785_form(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "key.pem")

    document = signer.sign(_certificate(2))

    assert verify_certificate(document, signer.public_key) == _certificate(2)
    signed = rfc8785.dumps(document["certificate"])
    signer.public_key.verify(_signature(document), signed)  # raises unless these are the signed bytes
    assert b'"acc_forget":100,' in signed and b'"mia":0.00001' in signed and b'"delta":0' in signed
    assert "Löschung".encode() in signed  # UTF-8, not \\u escapes
    # Keys in UTF-16 order, as JavaScript's sort() compares them: U+1F600 (D83D DE00) before U+FF01.
    assert signed.index("😀".encode()) < signed.index("\uff01".encode())


def test_the_verifier_picks_the_canonical_form_by_the_certificates_format(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    issued_before = _signed_the_old_way(key, _certificate(1))
    signed_elsewhere = _signed_by_another_jcs_implementation(key, _certificate(2))
    signer = Signer(tmp_path / "key.pem")

    assert verify_certificate(issued_before, key.public_key())["format"] == 1  # clients' files still verify
    assert verify_certificate(signed_elsewhere, key.public_key())["format"] == 2
    assert verify_certificate(signer.sign(_certificate(2)), signer.public_key)["format"] == 2
    # Read back from a file, a float format 2.0 is the number 2 (JavaScript cannot tell them apart).
    as_float = json.loads(json.dumps(signer.sign(_certificate(2))).replace('"format": 2', '"format": 2.0'))
    assert verify_certificate(as_float, signer.public_key)["format"] == 2


def test_a_certificate_whose_format_was_changed_fails(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "key.pem")
    format_2 = signer.sign(_certificate(2))
    signer.public_key.verify(_signature(format_2), rfc8785.dumps(format_2["certificate"]))  # it is format 2
    format_1 = _signed_the_old_way(signer.private_key, _certificate(1))

    # The format is inside the signed bytes: checked in the other form, neither matches.
    for document, changed_to in ((format_2, 1), (format_1, 2)):
        document["certificate"]["format"] = changed_to
        with pytest.raises(InvalidCertificate, match="does not match"):
            verify_certificate(document, signer.public_key)


@pytest.mark.parametrize("format_", [3, 0, "2", True, None, 1.5])
def test_an_unknown_format_fails_with_a_clear_message(tmp_path: Path, format_: Any) -> None:
    key = Ed25519PrivateKey.generate()
    # Signed over the old form, which any object has: only its format is wrong.
    document = _signed_the_old_way(key, _certificate(format_))

    with pytest.raises(InvalidCertificate, match=r"unknown certificate format .*: this version checks formats 1, 2"):
        verify_certificate(document, key.public_key())
    with pytest.raises(InvalidCertificate, match="unknown certificate format"):
        Signer(tmp_path / "key.pem").sign(_certificate(format_))


def test_an_integer_a_double_cannot_hold_is_not_signed_as_format_2(tmp_path: Path) -> None:
    certificate = _certificate(2)
    certificate["new_checkpoint"]["size_bytes"] = 2**53

    with pytest.raises(ValueError, match="exceeds safe integer domain"):
        Signer(tmp_path / "key.pem").sign(certificate)


def test_after_a_rotation_old_certificates_verify_by_the_retired_key_and_new_ones_by_the_new(tmp_path: Path) -> None:
    path = tmp_path / "certificate-key.pem"
    signer, other_process = Signer(path), Signer(path)
    before = signer.sign(_certificate(2))
    assert other_process.key_id == signer.key_id

    rotation = rotate_signing_key(path, signer.retired_dir)

    assert rotation.retired_key_id == before["signature"]["key_id"] != rotation.new_key_id
    assert rotation.retired_file == tmp_path / "certificate-key-retired" / f"{rotation.retired_key_id[7:]}.pem"
    # Both processes see the rotation at their next use of the key: no restart.
    after = signer.sign(_certificate(2))
    assert after["signature"]["key_id"] == other_process.key_id == rotation.new_key_id
    assert [(k.key_id, k.status) for k in other_process.published_keys()] == [
        (rotation.new_key_id, "active"), (rotation.retired_key_id, "retired")
    ]
    assert verify_with_service_keys(before, path, signer.retired_dir)[1] == "retired"
    assert verify_with_service_keys(after, path, signer.retired_dir)[1] == "active"


def test_a_deleted_retired_key_no_longer_verifies_what_it_signed(tmp_path: Path) -> None:
    path = tmp_path / "certificate-key.pem"
    signer = Signer(path)
    leaked = signer.sign(_certificate(2))
    rotation = rotate_signing_key(path, signer.retired_dir)

    rotation.retired_file.unlink()  # the leaked key: nothing it signed may check any more

    with pytest.raises(InvalidCertificate, match=f"signed by key {rotation.retired_key_id}, which is neither"):
        verify_with_service_keys(leaked, path, signer.retired_dir)
    assert [k.status for k in signer.published_keys()] == ["active"]


def test_a_key_id_from_a_certificate_never_names_another_file(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "certificate-key.pem")
    document = signer.sign(_certificate(2))
    document["signature"]["key_id"] = "sha256:../../certificate-key"

    with pytest.raises(InvalidCertificate, match="is not 'sha256:' followed by 64 hex digits"):
        verify_with_service_keys(document, signer.path, signer.retired_dir)


def test_a_retired_key_file_under_another_keys_name_is_refused(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "certificate-key.pem")
    document = signer.sign(_certificate(2))
    rotation = rotate_signing_key(signer.path, signer.retired_dir)
    impostor = retired_key_file(signer.retired_dir, "sha256:" + "0" * 64)
    impostor.write_bytes(rotation.retired_file.read_bytes())
    document["signature"]["key_id"] = "sha256:" + "0" * 64

    with pytest.raises(KeyFileError, match="not the one its name says"):
        verify_with_service_keys(document, signer.path, signer.retired_dir)


def test_there_is_nothing_to_rotate_before_the_key_exists(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no signing key at .* to rotate"):
        rotate_signing_key(tmp_path / "certificate-key.pem", tmp_path / "retired")
    assert not (tmp_path / "certificate-key.pem").exists()


def test_racing_rotations_retire_every_key_that_was_ever_active(tmp_path: Path) -> None:
    """Rotations take turns, and a process signing meanwhile only ever sees keys that end up active
    or retired: none signs with a key whose public half is lost."""
    path = tmp_path / "certificate-key.pem"
    signer = Signer(path)
    seen = {signer.key_id}
    done = threading.Event()

    def sign_meanwhile() -> None:
        while not done.is_set():
            seen.add(signer.sign(_certificate(2))["signature"]["key_id"])

    def rotate(times: int) -> None:
        for _ in range(times):
            rotate_signing_key(path, signer.retired_dir)

    reader = threading.Thread(target=sign_meanwhile)
    rotators = [threading.Thread(target=rotate, args=(5,)) for _ in range(4)]
    reader.start()
    for thread in rotators:
        thread.start()
    for thread in rotators:
        thread.join()
    done.set()
    reader.join()

    retired = load_retired_keys(signer.retired_dir)
    assert len(retired) == 20 and signer.key_id not in retired
    assert seen <= set(retired) | {signer.key_id}


def test_a_signing_key_that_went_missing_is_not_replaced_by_a_new_one(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "certificate-key.pem")
    first = signer.sign(_certificate(2))["signature"]["key_id"]
    saved = signer.path.read_bytes()
    signer.path.unlink()  # e.g. `rm` before a restore

    with pytest.raises(KeyFileError, match="missing; restore it"):
        signer.sign(_certificate(2))
    assert not signer.path.exists()

    signer.path.write_bytes(saved)
    assert signer.sign(_certificate(2))["signature"]["key_id"] == first


@pytest.mark.parametrize("existed", [True, False], ids=["key on disk", "key created on first use"])
def test_a_rotation_during_a_processs_first_read_of_the_key_is_seen_at_its_next_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool
) -> None:
    path, retired = tmp_path / "certificate-key.pem", tmp_path / "retired"
    if existed:
        Signer(path).active()
    read = certificates.load_or_create_private_key
    rotations: list[str] = []

    def read_then_rotate(key_path: Path) -> Ed25519PrivateKey:
        key = read(key_path)
        rotations.append(rotate_signing_key(key_path, retired).new_key_id)  # another process, just after
        return key

    monkeypatch.setattr(certificates, "load_or_create_private_key", read_then_rotate)
    signer = Signer(path, retired)
    signer.active()

    assert signer.sign(_certificate(2))["signature"]["key_id"] == rotations[0]


def test_one_bad_retired_key_file_does_not_hide_the_others(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "certificate-key.pem")
    signer.sign(_certificate(2))
    rotation = rotate_signing_key(signer.path, signer.retired_dir)
    misnamed = signer.retired_dir / f"{rotation.retired_key_id}.pem"  # 'sha256:' left in the name by hand
    misnamed.write_bytes(rotation.retired_file.read_bytes())

    statuses = {key.key_id: key.status for key in signer.published_keys()}

    assert statuses == {rotation.new_key_id: "active", rotation.retired_key_id: "retired"}
