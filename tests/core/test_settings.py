from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.settings import MIB, Settings, get_settings, unknown_environment_names


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # The developer's own UISPS_* variables must not leak into these tests.
    for name in list(os.environ):
        if name.startswith("UISPS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_live_under_home(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("UISPS_HOME", str(tmp_path))

    settings = Settings()

    assert settings.effective_database_url == f"sqlite:///{tmp_path}/uisps.db"
    assert settings.effective_broker_url == f"sqla+sqlite:///{tmp_path}/broker.db"
    assert settings.effective_artifact_dir == tmp_path / "artifacts"


def test_default_home_is_in_the_user_folder(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HOME", str(tmp_path))

    assert Settings().home == tmp_path / ".uisps"


def test_default_limits(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()

    assert (settings.device, settings.max_upload_bytes) == ("auto", 512 * MIB)
    assert settings.max_attempts == 3
    # the broker must not hand a job still within its time limit to a second worker
    assert settings.job_visibility_timeout_s > settings.job_time_limit_s
    assert settings.max_labels_per_request == 100


def test_environment_overrides_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("UISPS_DATABASE_URL", "postgresql+psycopg://db/uisps")
    clean_env.setenv("UISPS_BROKER_URL", "redis://broker:6379/0")
    clean_env.setenv("UISPS_ARTIFACT_DIR", str(tmp_path / "blobs"))
    clean_env.setenv("UISPS_MAX_ATTEMPTS", "5")

    settings = Settings()

    assert settings.effective_database_url == "postgresql+psycopg://db/uisps"
    assert settings.effective_broker_url == "redis://broker:6379/0"
    assert settings.effective_artifact_dir == tmp_path / "blobs"
    assert settings.max_attempts == 5


def test_empty_url_means_default(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("UISPS_HOME", str(tmp_path))
    clean_env.setenv("UISPS_DATABASE_URL", "")

    assert Settings().effective_database_url == f"sqlite:///{tmp_path}/uisps.db"


def test_get_settings_reads_the_current_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UISPS_DEVICE", "cpu")
    first = get_settings()
    clean_env.setenv("UISPS_DEVICE", "cuda")

    assert (first.device, get_settings().device) == ("cpu", "cuda")


def test_trust_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("UISPS_HOME", str(tmp_path))

    settings = Settings()

    # A dead worker's job is retaken within minutes, not after the 6-hour broker visibility timeout.
    assert settings.job_lease_s == 120 and settings.job_lease_s < settings.job_visibility_timeout_s
    assert settings.idempotency_ttl_s >= 24 * 3600
    assert settings.effective_certificate_key_path == tmp_path / "certificate-key.pem"
    assert settings.effective_certificate_retired_keys_dir == tmp_path / "certificate-key-retired"
    assert settings.rate_limit_per_s > 0 and settings.max_active_requests_per_tenant > 0
    clean_env.setenv("UISPS_CERTIFICATE_KEY_PATH", "~/keys/sign.pem")
    assert Settings().effective_certificate_key_path == Path("~/keys/sign.pem").expanduser()
    # Retired keys follow the key file unless set apart.
    assert Settings().effective_certificate_retired_keys_dir == Path("~/keys/sign-retired").expanduser()
    clean_env.setenv("UISPS_CERTIFICATE_RETIRED_KEYS_DIR", "~/keys/old")
    assert Settings().effective_certificate_retired_keys_dir == Path("~/keys/old").expanduser()


def test_webhooks_are_off_until_an_operator_sets_a_secret_and_hosts(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()

    assert settings.webhook_secret is None and settings.webhook_allowed_host_patterns == []
    assert not settings.webhook_allow_http and not settings.webhook_allow_private_addresses


def test_webhook_settings_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UISPS_WEBHOOK_SECRET", "whsec_" + "QUJD" * 8)  # base64 of 24 bytes
    clean_env.setenv("UISPS_WEBHOOK_ALLOWED_HOSTS", " Hooks.Example.com, *.acme.test ,")

    settings = Settings()

    assert settings.webhook_secret.get_secret_value() == "whsec_" + "QUJD" * 8
    assert "QUJD" not in repr(settings)  # a secret stays out of logs and tracebacks
    assert settings.webhook_allowed_host_patterns == ["hooks.example.com", "*.acme.test"]


@pytest.mark.parametrize("secret", ["changeme", "whsec_not base64!", "whsec_" + "QUJD" * 4, "QUJD" * 8])
def test_a_webhook_secret_of_another_form_is_refused(clean_env: pytest.MonkeyPatch, secret: str) -> None:
    clean_env.setenv("UISPS_WEBHOOK_SECRET", secret)

    with pytest.raises(ValueError, match="whsec_") as refused:
        Settings()

    assert secret not in str(refused.value)  # the refusal is logged: the value must not be in it


@pytest.mark.parametrize(("name", "url"), [
    ("UISPS_DATABASE_URL", "postgresql+psycopg://uisps:...@postgres:5432/uisps"),  # docs/deploy.md's .env, unchanged
    ("UISPS_BROKER_URL", "redis://:changeme@redis:6379/0"),
])
def test_a_placeholder_password_in_a_service_url_is_refused_at_start(
    clean_env: pytest.MonkeyPatch, name: str, url: str
) -> None:
    from core.settings import SettingsError

    clean_env.setenv(name, url)

    with pytest.raises(SettingsError, match=f"^{name}: .*is a placeholder"):
        get_settings()


def test_a_real_password_and_a_url_without_one_are_taken(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UISPS_DATABASE_URL", "postgresql+psycopg://uisps:4f1c9e@postgres:5432/uisps")
    clean_env.setenv("UISPS_BROKER_URL", "redis://redis:6379/0")

    settings = get_settings()

    assert settings.database_url.endswith("4f1c9e@postgres:5432/uisps") and settings.broker_url == "redis://redis:6379/0"


def test_unknown_uisps_variables_are_named_with_the_setting_they_likely_meant() -> None:
    environ = {
        "UISPS_DATABSE_URL": "postgresql+psycopg://db/uisps",  # misspelt
        "UISPS_FLUX_CAPACITOR": "1",  # nothing close
        "UISPS_DATABASE_URL": "postgresql+psycopg://db/uisps",  # settings, and names read elsewhere, pass
        "UISPS_API_WORKERS": "2",
        "UISPS_TEST_PG_ADMIN_DSN": "postgresql://",
        "HOME": "/root",
    }

    assert unknown_environment_names(environ) == [
        "UISPS_DATABSE_URL (did you mean UISPS_DATABASE_URL?)", "UISPS_FLUX_CAPACITOR",
    ]


def test_a_previous_webhook_secret_is_checked_and_needs_a_current_one(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UISPS_WEBHOOK_SECRET_PREVIOUS", "whsec_" + "QUJD" * 8)
    with pytest.raises(ValueError, match="without UISPS_WEBHOOK_SECRET"):
        Settings()

    clean_env.setenv("UISPS_WEBHOOK_SECRET", "whsec_" + "REVG" * 8)
    assert Settings().webhook_service_secrets == ["whsec_" + "REVG" * 8, "whsec_" + "QUJD" * 8]

    clean_env.setenv("UISPS_WEBHOOK_SECRET_PREVIOUS", "changeme")
    with pytest.raises(ValueError, match="UISPS_WEBHOOK_SECRET_PREVIOUS must be 'whsec_'"):
        Settings()


@pytest.mark.parametrize(("given", "level"), [("warn", "WARNING"), ("Fatal", "CRITICAL"), ("debug", "DEBUG")])
def test_a_log_level_is_one_that_logging_celery_and_uvicorn_all_take(given: str, level: str) -> None:
    assert Settings(log_level=given).log_level == level


def test_a_log_level_only_some_of_them_know_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import SettingsError

    monkeypatch.setenv("UISPS_LOG_LEVEL", "trace")  # uvicorn's, not Python's
    with pytest.raises(SettingsError, match="UISPS_LOG_LEVEL: .*must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG"):
        get_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UISPS_RECONCILE_INTERVAL_S", "0"),  # the reconciler thread would spin on the database
        ("UISPS_WEBHOOK_POLL_INTERVAL_S", "-1"),
        ("UISPS_JOB_LEASE_S", "0"),  # every claim's lease over as it is written: jobs taken over
        ("UISPS_MAX_ATTEMPTS", "0"),
        ("UISPS_DB_POOL_SIZE", "-5"),
        ("UISPS_API_READ_THREADS", "0"),
        ("UISPS_MAX_CONCURRENT_UPLOADS", "0"),
        ("UISPS_ARTIFACT_BACKEND", "gcs"),
    ],
)
def test_a_value_the_service_cannot_run_with_is_refused_at_start(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from core.settings import SettingsError

    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=f"^{name}: "):
        get_settings()


def test_the_artifact_backend_name_is_read_in_any_case(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("UISPS_ARTIFACT_BACKEND", " S3")
    clean_env.setenv("UISPS_S3_BUCKET", "checkpoints")

    assert get_settings().artifact_backend == "s3"


def test_the_s3_backend_without_a_bucket_is_refused_at_start(clean_env: pytest.MonkeyPatch) -> None:
    from core.settings import SettingsError

    clean_env.setenv("UISPS_ARTIFACT_BACKEND", "s3")
    with pytest.raises(SettingsError, match="UISPS_ARTIFACT_BACKEND=s3 needs UISPS_S3_BUCKET"):
        get_settings()
