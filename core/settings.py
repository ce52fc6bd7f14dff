"""Service settings, read from ``UISPS_*`` environment variables.

Every setting has an embedded default so that a fresh machine runs the whole flow with no
services: SQLite for the database, a SQLite-backed Celery broker, and a local artifact folder,
all under ``UISPS_HOME`` (``~/.uisps``). Production points ``UISPS_DATABASE_URL`` at PostgreSQL
and ``UISPS_BROKER_URL`` at Redis.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import UisError

MIB = 1024 * 1024


MAX_WEBHOOK_SECRET_OVERLAP_S = 30 * 24 * 60 * 60


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# Passwords that stand for "put yours here" in templates (docs/deploy.md writes `...`).
PLACEHOLDER_PASSWORDS = frozenset({"...", "changeme", "change-me", "changethis", "password", "secret", "xxx"})


class Settings(BaseSettings):
    # Every number has its bounds: a 0 or negative interval, lease or pool size is accepted by
    # Python and then spins a thread, expires every lease as it is written, or fails each job.
    # hide_input_in_errors: a malformed secret (UISPS_WEBHOOK_SECRET, say) must not reach the logs
    # in the error that refuses it.
    model_config = SettingsConfigDict(env_prefix="UISPS_", extra="ignore", hide_input_in_errors=True)

    home: Path = Path("~/.uisps")
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    artifact_backend: Literal["local", "s3"] = "local"
    device: str = "auto"
    max_upload_bytes: int = Field(512 * MIB, ge=1)
    # Checkpoint uploads one API process checks at once: each holds the file and its tensors in
    # memory (about twice its size), so this bounds that memory. Others wait up to
    # upload_wait_s, then get 503 with Retry-After.
    max_concurrent_uploads: int = Field(2, ge=1)
    upload_wait_s: float = Field(10.0, ge=0)
    # Checkpoint uploads one API process receives at once: each body is spooled to a temporary
    # file of up to max_upload_bytes before it is checked, so this bounds the disk a burst of
    # uploads can fill. Beyond it, 503 with Retry-After at once, before a byte is read.
    max_receiving_uploads: int = Field(8, ge=1)
    # An upload whose body stops arriving for this long is refused (408): a sender that stalls
    # would otherwise hold its receiving slot, and its temporary file, for as long as it keeps the
    # connection open. Idle time, not the whole transfer: a slow link still uploads.
    upload_idle_timeout_s: float = Field(60.0, gt=0)
    # A job whose lease ran out is presumed dead (worker crashed) and may be re-queued.
    # Above job_time_limit_s, which is checked at a job's progress reports (so a job may pass it
    # by a report's interval): below it, the broker would hand a running job's message to a second worker.
    job_visibility_timeout_s: int = Field(7 * 60 * 60, gt=0)
    # A job still running after this long (its parameters asked for more work than the fleet
    # gives one request) fails with time_limit_exceeded at its next progress report, not retried.
    job_time_limit_s: float = Field(6 * 60 * 60, gt=0)
    max_attempts: int = Field(3, ge=1)
    # An artifact-store outage is retried without using up attempts for this long (from the first
    # of its retries in a row); then the request fails as any other error does.
    store_outage_max_s: float = Field(24 * 60 * 60, ge=0)
    max_labels_per_request: int = Field(100, ge=1)
    # Folders a model's data source may lie under, comma-separated (`/data`, or `/data/{tenant}`
    # for a folder per tenant: `{tenant}` stands for the tenant's id). Checked when a model is
    # registered and again by the worker before it reads. Empty, the default: no data files at
    # all, only the built-in `digits`, until an operator names the roots.
    data_roots: str = ""

    # --- Trust (issue #5): API keys, limits, crash-safe jobs, certificates ----------------------
    # A running job renews its lease while it works (progress writes and a heartbeat every third
    # of it); a job whose lease ran out lost its worker and is taken over by the next one.
    job_lease_s: float = Field(120.0, gt=0)
    # The worker's reconciler: how often it looks for lost work, and how long a queued request
    # may wait unclaimed before its message is presumed lost and sent again (the wait doubles
    # with each re-send, so a long backlog is not flooded with duplicates).
    reconcile_interval_s: float = Field(30.0, gt=0)
    requeue_after_s: float = Field(300.0, gt=0)
    # Idempotency-Key records are kept at least this long (then purged by the reconciler); a
    # record still "in flight" after idempotency_lock_s belongs to a request that died.
    idempotency_ttl_s: int = Field(24 * 60 * 60, gt=0)
    idempotency_lock_s: float = Field(600.0, gt=0)
    # Token bucket per API key: `rate_limit_per_s` requests per second on average, bursts of up
    # to `rate_limit_burst`. 0 turns the limit off.
    rate_limit_per_s: float = Field(20.0, ge=0)
    rate_limit_burst: int = Field(200, ge=1)
    # The same for all of a tenant's keys together (each request takes a token from both buckets),
    # so that more keys do not mean more of the service. 0 turns it off.
    tenant_rate_limit_per_s: float = Field(100.0, ge=0)
    tenant_rate_limit_burst: int = Field(1000, ge=1)
    # Where the buckets live: `redis` (the broker's Redis, one bucket per key for every API
    # process), `memory` (per API process: exact for one process, N times the rate with N), `auto`
    # (redis when the broker is Redis, else memory). A Redis outage lets requests through.
    rate_limit_backend: Literal["auto", "redis", "memory"] = "auto"
    # Each API process trusts a key it verified for this long without reading it again: a key
    # revoked through another process (or `uisps keys revoke`) works here for at most this long.
    # Revoked through this process's API, it is refused at once. 0: read the key every request.
    api_key_cache_ttl_s: float = Field(5.0, ge=0)
    # PostgreSQL connections each API process keeps open (its reads never use more, so polling
    # opens no new ones), and how many more it may open for a burst of writes (closed again when
    # returned: PostgreSQL starts a process for each). The server's max_connections must cover
    # every API process's pool_size + max_overflow, plus the workers.
    # (SQLAlchemy's "no limit" values, pool_size 0 and max_overflow -1, are refused: a bound is the point.)
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    # Reads (GET /deletion-requests/{id}) one API process runs at once, each in a worker thread:
    # one can compute while another waits for PostgreSQL; more only fight over the GIL (with 10,
    # the p99 under load doubled). Raise it when PostgreSQL is a slow round trip away.
    api_read_threads: int = Field(2, ge=1)
    # Queued + running deletion requests one tenant may have at once (429 beyond).
    max_active_requests_per_tenant: int = Field(50, ge=1)
    # Unrevoked API keys one tenant may hold (409 beyond, over HTTP): each key has its own rate
    # limit, so without a cap a tenant could make itself any rate. `uisps keys create` is not held to it.
    max_api_keys_per_tenant: int = Field(100, ge=1)
    # Largest checkpoint accepted, in parameters (elements of all tensors together).
    max_checkpoint_parameters: int = Field(250_000_000, ge=1)
    # Largest data set a worker decodes (npz and imagefolder sources: checked from their headers
    # before decoding, since a small compressed file may decode to gigabytes). 4 GiB holds full
    # CIFAR-10 (184 MB) twenty times over; the worker holds a float copy of D_r on its device too.
    max_dataset_bytes: int = Field(4096 * MIB, ge=1)
    # Ed25519 key that signs deletion certificates; created on first use when missing.
    certificate_key_path: Path | None = None
    # The public halves of signing keys that `uisps certificate rotate-key` retired, one
    # `<hex of key_id>.pem` each: certificates they signed still verify. Default: the folder
    # `<key file's stem>-retired` beside the key file, so two keys in one folder never share it.
    certificate_retired_keys_dir: Path | None = None

    @property
    def effective_certificate_key_path(self) -> Path:
        path = self.certificate_key_path if self.certificate_key_path is not None else self.home / "certificate-key.pem"
        return path.expanduser()

    @property
    def effective_certificate_retired_keys_dir(self) -> Path:
        if self.certificate_retired_keys_dir is not None:
            return self.certificate_retired_keys_dir.expanduser()
        return retired_keys_dir_beside(self.effective_certificate_key_path)
    # --- end of the trust settings ----------------------------------------------------------------

    # --- Observability (issue #7): logs and metrics -----------------------------------------------
    # `json` (one object per line, with request_id / deletion_request_id) for log collectors;
    # `text` for a terminal.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # One INFO line per HTTP request (logger `uisps.access`: method, route, status, duration).
    access_log: bool = True
    # /metrics: job stage timings are averaged over this many most recently finished jobs.
    metrics_recent_jobs: int = Field(100, ge=1)
    # --- end of the observability settings --------------------------------------------------------

    # --- Webhooks (issue #7): a signed event when a deletion request ends ------------------------
    # The Standard Webhooks signing secret, `whsec_` + base64 of 24 to 64 random bytes; the API and
    # every worker need the same one. Unset: a callback_url is refused (422 webhooks_not_configured).
    webhook_secret: SecretStr | None = None
    # While the operator replaces UISPS_WEBHOOK_SECRET, the one before: every tenant's events also
    # carry the signatures of the secrets derived from it, so receivers refuse nothing until their
    # tenant has read its new secret. Remove it once they have.
    webhook_secret_previous: SecretStr | None = None
    # Hosts a callback URL may name, comma-separated: `hooks.example.com`, `*.example.com` (its
    # subdomains), `*` (any host). Empty, the default: none, so webhooks stay off until an operator
    # names the receivers.
    webhook_allowed_hosts: str = ""
    # http:// callbacks (default: https only), and receivers on private, loopback, link-local or
    # other non-public addresses (default: refused, checked on the addresses resolved at send time).
    webhook_allow_http: bool = False
    webhook_allow_private_addresses: bool = False
    # Attempts per event; the wait after attempt n is base * 2**(n-1) seconds, at most max.
    webhook_max_attempts: int = Field(10, ge=1)
    webhook_retry_base_s: float = Field(10.0, ge=0)
    webhook_retry_max_s: float = Field(3600.0, ge=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    # How often each worker's webhook sender looks for due deliveries.
    webhook_poll_interval_s: float = Field(2.0, gt=0)
    # After a tenant rotates its secret, its events carry a second signature, by the secret before,
    # for this long (Standard Webhooks allows several): receivers switch without refusing events.
    # Fixed at each rotation (a rotation may ask for less). At most 30 days.
    webhook_secret_overlap_s: float = Field(default=86400.0, ge=0, le=MAX_WEBHOOK_SECRET_OVERLAP_S)

    @field_validator("log_level", mode="after")
    @classmethod
    def _log_level(cls, value: str) -> str:
        # One name that Python's logging, Celery and uvicorn all take (they differ on WARN, FATAL
        # and TRACE): a name only some of them know would fail the service as it starts.
        level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(value.upper(), value.upper())
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level

    @field_validator("webhook_secret", "webhook_secret_previous", mode="after")
    @classmethod
    def _webhook_secret_form(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        secret = value.get_secret_value()
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            key = b""
        if not secret.startswith("whsec_") or len(key) < 24:
            name = f"UISPS_{info.field_name.upper()}"
            raise ValueError(f"{name} must be 'whsec_' followed by base64 of at least 24 random bytes")
        return value

    @field_validator("artifact_backend", mode="before")
    @classmethod
    def _backend_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        # Refused here, where every process starts, not in the first job that stores a version.
        if self.artifact_backend == "s3" and not self.s3_bucket:
            raise ValueError("UISPS_ARTIFACT_BACKEND=s3 needs UISPS_S3_BUCKET")
        if self.s3_sse_kms_key_id and self.s3_sse != "aws:kms":
            raise ValueError("UISPS_S3_SSE_KMS_KEY_ID needs UISPS_S3_SSE=aws:kms")
        return self

    @model_validator(mode="after")
    def _previous_webhook_secret_needs_a_current_one(self) -> Settings:
        if self.webhook_secret_previous is not None and self.webhook_secret is None:
            raise ValueError("UISPS_WEBHOOK_SECRET_PREVIOUS is set without UISPS_WEBHOOK_SECRET")
        return self

    @property
    def webhook_service_secrets(self) -> list[str]:
        """The service secrets tenants' signing secrets are derived from, the current one first."""
        secrets = (self.webhook_secret, self.webhook_secret_previous)
        return [secret.get_secret_value() for secret in secrets if secret is not None]

    @property
    def webhook_allowed_host_patterns(self) -> list[str]:
        return [host.strip().lower().rstrip(".") for host in self.webhook_allowed_hosts.split(",") if host.strip()]
    # --- end of the webhook settings ---------------------------------------------------------------

    # --- Request coalescing (issue #7) ------------------------------------------------------------
    # A worker that claims a queued request also takes the other queued requests one job can serve
    # (same tenant, model, base version number, method and overrides) and forgets all their labels
    # at once: one job, one version; each request keeps its own state, audit events, certificate and
    # webhook. false: every request runs a job of its own.
    coalesce_requests: bool = True
    # --- end of the coalescing settings -----------------------------------------------------------

    # --- S3-compatible artifact storage (UISPS_ARTIFACT_BACKEND=s3) ------------------------------
    # Credentials are deliberately not settings: boto3 finds them the standard way
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, an instance role).
    s3_bucket: str | None = None
    s3_prefix: str = ""  # e.g. "uisps/prod": objects are "<prefix>/tenants/<tenant>/sha256/ab/<hex>"
    s3_endpoint_url: str | None = None  # MinIO, Ceph, R2...; None means AWS S3
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"  # MinIO wants "path"
    # Encryption at rest asked for on every object written, whatever the bucket's default: "AES256"
    # (keys the server manages) or "aws:kms" (a KMS key: s3_sse_kms_key_id, or the account's
    # aws/s3 key). "" leaves it to the bucket (AWS encrypts new objects with AES256 by default).
    s3_sse: Literal["", "AES256", "aws:kms"] = ""
    s3_sse_kms_key_id: str | None = None

    @field_validator("s3_bucket", "s3_endpoint_url", "s3_region", "s3_sse_kms_key_id", mode="after")
    @classmethod
    def _s3_empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    # --- end of S3 settings ---------------------------------------------------------------------

    @field_validator("home", "artifact_dir", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("database_url", "broker_url", mode="after")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # `UISPS_DATABASE_URL=` in a .env or compose file means "use the default", not "".
        return value or None

    @field_validator("database_url", "broker_url", mode="after")
    @classmethod
    def _no_placeholder_password(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A .env copied from docs/deploy.md unchanged reaches here as `...`: refuse to start on a
        # password anyone can read in the docs rather than run with it.
        try:
            password = urlsplit(value).password if value else None
        except ValueError:  # not a URL this can read: the driver says what is wrong with it
            return value
        if password is not None and unquote(password).lower() in PLACEHOLDER_PASSWORDS:
            raise ValueError(f"the password in UISPS_{info.field_name.upper()} is a placeholder "
                             f"({unquote(password)!r}): set a real one (docs/deploy.md, Secrets)")
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'uisps.db'}"

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.home / 'broker.db'}"

    @property
    def data_root_list(self) -> list[str]:
        return [root.strip() for root in self.data_roots.split(",") if root.strip()]

    @property
    def effective_artifact_dir(self) -> Path:
        return self.artifact_dir if self.artifact_dir is not None else self.home / "artifacts"


def retired_keys_dir_beside(key_path: Path) -> Path:
    """The default retired-keys folder of the signing key at `key_path`."""
    return key_path.parent / f"{key_path.stem}-retired"


# UISPS_* names read outside Settings: CLI options, the version stamp, compose's interpolation
# (.env), the benchmarks; and UISPS_TEST_* by the test suite.
OTHER_ENVIRONMENT_NAMES = frozenset({
    "UISPS_API_WORKERS", "UISPS_CODE_VERSION", "UISPS_CIFAR10_SUBSET",
    "UISPS_API_BIND", "UISPS_API_PORT", "UISPS_IMAGE", "UISPS_DATA_DIR", "UISPS_WORKER_DEVICE",
    "UISPS_SCHEMATHESIS_EXAMPLES", "UISPS_SCREENSHOT_DIR",
})


def unknown_environment_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """`UISPS_*` variables that no setting reads, each with the setting it most likely meant.

    Settings ignore unknown names, so a misspelt UISPS_DATABASE_URL would leave the embedded
    SQLite database in use: an API serving an empty database, a worker taking messages it cannot
    run. The long-running commands refuse to start on these instead.
    """
    environ = os.environ if environ is None else environ
    known = {f"UISPS_{name.upper()}" for name in Settings.model_fields} | OTHER_ENVIRONMENT_NAMES
    found = []
    for name in sorted(environ):
        if not name.startswith("UISPS_") or name in known or name.startswith("UISPS_TEST_"):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found


class SettingsError(UisError):
    """A UISPS_* variable whose value the settings refuse: one line that names it, not a traceback."""

    code = "invalid_setting"


def get_settings() -> Settings:
    """Build settings from the current environment (fresh each call; tests change the env)."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "UISPS_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
        raise SettingsError(f"{where}: {error['msg']}") from None


@lru_cache(maxsize=1)
def cached_settings() -> Settings:
    """Settings read once per process, for hot paths such as FastAPI dependencies."""
    return Settings()
