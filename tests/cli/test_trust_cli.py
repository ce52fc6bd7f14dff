"""`uisps keys`, `uisps audit verify` and `uisps certificate verify`, on the embedded SQLite database
and on a PostgreSQL database of this test's own (the audit test tampers with it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from core.certificates import Signer
from core.db import AuditEvent, Model, ModelVersion, make_engine, make_sessionmaker
from core.db.migrate import upgrade
from core.services.deletion_requests.jobs import deletion_jobs
from core.services.deletion_requests.service import deletion_request_service
from core.settings import Settings
from core.storage import StoredArtifact
from uisps.cli import app

runner = CliRunner()


def uisps(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(params=["sqlite", "postgresql"])
def home(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """UISPS_HOME (and, for PostgreSQL, UISPS_DATABASE_URL) as the command line reads them."""
    for name in ("UISPS_DATABASE_URL", "UISPS_BROKER_URL", "UISPS_CERTIFICATE_KEY_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    if request.param == "postgresql":
        # A database of its own: the audit test tampers with it.
        monkeypatch.setenv("UISPS_DATABASE_URL", request.getfixturevalue("own_pg_database"))
    settings = Settings()
    upgrade(settings.effective_database_url)
    return settings


def _sessions(settings: Settings):  # noqa: ANN202
    return make_sessionmaker(make_engine(settings.effective_database_url))


def _succeeded_request(settings: Settings, tenant: str = "acme", external_ref: str | None = None) -> str:
    """A model, a version 1 and a succeeded deletion request, written straight to the database."""
    sessions = _sessions(settings)
    with sessions.begin() as session:
        model = Model(tenant_id=tenant, name=f"m-{uuid.uuid4().hex[:8]}", architecture="smallcnn", arch_kwargs={},
                      num_classes=10, class_names=[str(i) for i in range(10)], input_shape=[1, 8, 8], mean=[0.3],
                      std=[0.4], data_source="digits")
        session.add(model)
        session.flush()
        session.add(ModelVersion(tenant_id=tenant, model_id=model.id, version=1, artifact_key="sha256/aa/" + "a" * 64,
                                 sha256="a" * 64, size_bytes=10, forgotten_labels=[]))
        session.flush()
        request = deletion_request_service.create(
            session, tenant_id=tenant, actor="test", settings=settings, model_id=model.id, forget_labels=[7],
            external_ref=external_ref, dispatch=lambda _id, _priority: None,
        )
        request_id = request.id
    with sessions.begin() as session:
        job = deletion_jobs.claim(session, request_id, lease_s=60).job
        deletion_jobs.complete(
            session, request_id, artifact=StoredArtifact("sha256/bb/" + "b" * 64, "b" * 64, 10),
            forgotten_labels=[7], metrics={"after": {"acc_forget": 0.0}, "code_version": "test"}, attempt=job.attempt,
        )
    return request_id


def test_keys_are_created_listed_and_revoked(home: Settings) -> None:
    code, out = uisps("keys", "create", "--tenant", "acme", "--role", "compliance", "--name", "dpo")
    assert code == 0
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("uisps_") and len(secret) == 49

    code, out = uisps("keys", "list", "--json")
    assert code == 0
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["role"] == "compliance" and listed["name"] == "dpo" and secret[:12] == listed["prefix"]
    assert secret not in out  # only the prefix is ever shown again

    assert uisps("keys", "revoke", listed["id"])[0] == 0
    assert json.loads(uisps("keys", "list", "--json")[1])["revoked_at"] is not None
    assert uisps("keys", "revoke", "no-such-key") == (2, "error: API key no-such-key does not exist\n")
    code, out = uisps("keys", "create", "--tenant", "acme", "--role", "owner")
    assert code == 2 and "role must be one of admin, compliance, reader" in out
    code, out = uisps("keys", "create", "--tenant", "acme", "--role", "reader", "--name", "x" * 201)
    assert code == 2 and "name must be 1 to 200 characters" in out  # as the API says, on every database


def test_audit_verify_names_the_first_changed_row(home: Settings) -> None:
    _succeeded_request(home, "acme")
    _succeeded_request(home, "globex")
    code, out = uisps("audit", "verify")
    assert code == 0 and out.startswith("OK: ") and "2 tenant chain(s)" in out

    sessions = _sessions(home)
    with sessions.begin() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.tenant_id == "acme").order_by(AuditEvent.id)))
        victim = events[2]
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        else:
            session.execute(text("DROP TRIGGER audit_events_no_update"))
        session.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = :id"), {"id": victim.id})

    code, out = uisps("audit", "verify")

    assert code == 1
    assert f"BROKEN: tenant 'acme': audit event {victim.id} ({victim.action}" in out
    assert "content no longer matches its hash" in out
    assert "1 broken chain(s), 1 intact" in out
    assert uisps("audit", "verify", "--tenant", "globex")[0] == 0


def test_certificate_verify_accepts_the_real_one_and_refuses_a_changed_one(home: Settings, tmp_path: Path) -> None:
    request_id = _succeeded_request(home)
    signer = Signer(home.effective_certificate_key_path)  # the key the service signs with
    with _sessions(home)() as session:
        document = signer.sign(deletion_request_service.certificate_content(session, "acme", request_id))
    good = tmp_path / "certificate.json"
    good.write_text(json.dumps(document, indent=2))
    pem = tmp_path / "key.pem"
    pem.write_bytes(signer.public_key_pem())

    code, out = uisps("certificate", "verify", str(good))
    assert code == 0 and f"OK: deletion request {request_id} of tenant 'acme': labels [7] forgotten" in out
    assert uisps("certificate", "verify", str(good), "--public-key", str(pem))[0] == 0

    forged = json.loads(good.read_text())
    forged["certificate"]["new_checkpoint"]["sha256"] = "c" * 64
    bad = tmp_path / "forged.json"
    bad.write_text(json.dumps(forged))
    code, out = uisps("certificate", "verify", str(bad), "--public-key", str(pem))
    assert code == 1 and out.startswith("INVALID: the signature does not match")

    other = tmp_path / "other.pem"
    other.write_bytes(Signer(tmp_path / "elsewhere" / "k.pem").public_key_pem())
    code, out = uisps("certificate", "verify", str(good), "--public-key", str(other))
    assert code == 1 and "not by the given public key" in out
    (tmp_path / "junk.json").write_text("{not json")
    assert uisps("certificate", "verify", str(tmp_path / "junk.json"))[0] == 1
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert uisps("certificate", "verify", str(tmp_path / "deep.json")) == (1, f"INVALID: {tmp_path / 'deep.json'} "
                                                                           "is nested too deeply to be a certificate\n")
    assert uisps("certificate", "verify", str(tmp_path / "missing.json"))[0] == 2
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04\x95\xff\xfe")  # the wrong file, not text
    code, out = uisps("certificate", "verify", str(tmp_path / "model.safetensors"))
    assert code == 2 and "not a certificate" in out


@pytest.fixture
def key_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """UISPS_HOME with no database: rotation and verification read only the key files."""
    for name in ("UISPS_CERTIFICATE_KEY_PATH", "UISPS_CERTIFICATE_RETIRED_KEYS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path / "home"))
    return Settings()


def _write_signed(signer: Signer, path: Path, request_id: str) -> Path:
    certificate = {"type": "uisps.deletion-certificate", "format": 2, "request_id": request_id, "tenant_id": "acme",
                   "labels": {"forgotten": [7]}, "new_checkpoint": {"version": 2, "sha256": "b" * 64}}
    path.write_text(json.dumps(signer.sign(certificate)))
    return path


def test_certificate_verify_refuses_what_a_reader_could_take_for_certified(key_home: Settings, tmp_path: Path) -> None:
    good = _write_signed(Signer(key_home.effective_certificate_key_path), tmp_path / "good.json", "r-1")
    text = good.read_text()
    assert uisps("certificate", "verify", str(good))[0] == 0
    # a second "labels" after the signed one: a reader keeping the first sees [3], the check the last
    twice = text.replace('"labels": {', '"labels": {"forgotten": [3]}, "labels": {', 1)
    outside = json.dumps({**json.loads(text), "note": "labels 3, 4 and 5 forgotten too"})
    in_signature = text.replace('"algorithm"', '"signed_at": "2030-01-01", "algorithm"', 1)

    for name, changed, said in [("twice", twice, "names 'labels' twice"), ("outside", outside, "outside what was signed: note"),
                                ("in_signature", in_signature, "signature.signed_at")]:
        (tmp_path / f"{name}.json").write_text(changed)
        code, out = uisps("certificate", "verify", str(tmp_path / f"{name}.json"))
        assert code == 1 and out.startswith("INVALID") and said in out, (name, out)


def test_certificate_verify_reads_utf8_whatever_the_locale(home: Settings, tmp_path: Path) -> None:
    request_id = _succeeded_request(home, external_ref="GDPR-Müller-42")
    signer = Signer(home.effective_certificate_key_path)
    with _sessions(home)() as session:
        document = signer.sign(deletion_request_service.certificate_content(session, "acme", request_id))
    saved = tmp_path / "certificate.json"
    saved.write_bytes(json.dumps(document, ensure_ascii=False).encode())  # as the service sends it: UTF-8
    ascii_locale = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # an auditor's bare shell

    verified = subprocess.run([sys.executable, "-m", "uisps", "certificate", "verify", str(saved)],
                              env=os.environ | ascii_locale, capture_output=True, text=True, timeout=60)

    assert verified.returncode == 0 and verified.stdout.startswith(f"OK: deletion request {request_id}"), verified


def test_certificate_rotate_key_keeps_old_certificates_verifiable_until_their_key_is_deleted(
    key_home: Settings, tmp_path: Path
) -> None:
    signer = Signer(key_home.effective_certificate_key_path)
    old_id = signer.key_id
    before = _write_signed(signer, tmp_path / "before.json", "r-before")

    code, out = uisps("certificate", "rotate-key")

    assert code == 0, out
    retired_file = key_home.home / "certificate-key-retired" / f"{old_id.removeprefix('sha256:')}.pem"
    assert f"retired key {old_id}: its public half is {retired_file}" in out
    new_id = signer.key_id  # the running signer follows the file
    assert new_id != old_id and f"new signing key {new_id}" in out
    after = _write_signed(signer, tmp_path / "after.json", "r-after")
    code, out = uisps("certificate", "verify", str(before))
    assert code == 0 and "OK: deletion request r-before of tenant 'acme'" in out
    assert f"(signed by the retired key {old_id})" in out
    code, out = uisps("certificate", "verify", str(after))
    assert code == 0 and "OK: deletion request r-after" in out and "retired" not in out

    retired_file.unlink()  # the key leaked: what it signed must no longer check

    code, out = uisps("certificate", "verify", str(before))
    assert code == 1 and out.startswith(f"INVALID: signed by key {old_id}, which is neither this service's signing key")
    assert uisps("certificate", "verify", str(after))[0] == 0


def test_certificate_rotate_key_needs_a_key_and_honours_the_retired_keys_setting(
    key_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = uisps("certificate", "rotate-key")
    assert code == 2 and "there is no signing key at" in out
    assert not key_home.effective_certificate_key_path.exists()  # rotating creates nothing
    monkeypatch.setenv("UISPS_CERTIFICATE_RETIRED_KEYS_DIR", str(tmp_path / "elsewhere"))
    signer = Signer(key_home.effective_certificate_key_path)
    old_id = signer.key_id

    assert uisps("certificate", "rotate-key")[0] == 0

    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [f"{old_id.removeprefix('sha256:')}.pem"]


def test_audit_verify_on_a_database_that_does_not_exist_fails_rather_than_reporting_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UISPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("UISPS_HOME", str(tmp_path / "typo"))  # a wrong UISPS_HOME

    code, out = uisps("audit", "verify")

    assert code == 2 and "OK" not in out and "UISPS_DATABASE_URL" in out
    assert not (tmp_path / "typo" / "uisps.db").exists()  # nor is one made


def test_a_key_is_not_written_where_a_setting_is_misspelt(home: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # UISPS_DATABASE_URI: the key would go to the embedded database, and production would answer 401.
    monkeypatch.setenv("UISPS_DATABASE_URI", "postgresql://production/uisps")

    code, out = uisps("keys", "create", "--tenant", "acme", "--role", "admin")

    assert code == 2 and "UISPS_DATABASE_URI (did you mean UISPS_DATABASE_URL?)" in out


@pytest.mark.parametrize("command", [("db", "upgrade"), ("db", "downgrade")])
def test_no_database_is_migrated_where_a_setting_is_misspelt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    # compose's `migrate` would otherwise report success on an embedded database nobody serves.
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.delenv("UISPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("UISPS_DATABASE_URI", "postgresql://production/uisps")

    code, out = uisps(*command)

    assert code == 2 and "UISPS_DATABASE_URI (did you mean UISPS_DATABASE_URL?)" in out
    assert not (tmp_path / "uisps.db").exists()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("UISPS_RATE_LIMIT_PER_S", "abc", "UISPS_RATE_LIMIT_PER_S: Input should be a valid number"),
     ("UISPS_DATABASE_URL", "foo", "UISPS_DATABASE_URL is not a database this service can use")],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv("UISPS_HOME", str(tmp_path))
    monkeypatch.setenv(name, value)

    commands = [("db", "upgrade"), ("keys", "list"), ("audit", "verify")]
    if name != "UISPS_DATABASE_URL":  # it reads no database
        commands.append(("certificate", "verify", "c.json"))
    for command in commands:
        code, out = uisps(*command)
        assert code == 2 and message in out and "Traceback" not in out, command
