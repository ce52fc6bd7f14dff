"""Service settings, read from ``UISPS_*`` environment variables.

Every setting has an embedded default so that a fresh machine runs the whole flow with no
services: SQLite for the database, a SQLite-backed Celery broker, and a local artifact folder,
all under ``UISPS_HOME`` (``~/.uisps``). Production points ``UISPS_DATABASE_URL`` at PostgreSQL
and ``UISPS_BROKER_URL`` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UISPS_", extra="ignore")

    home: Path = Path("~/.uisps")
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    artifact_backend: str = "local"
    device: str = "auto"
    max_upload_bytes: int = 512 * MIB
    # A job whose lease ran out is presumed dead (worker crashed) and may be re-queued.
    job_visibility_timeout_s: int = 6 * 60 * 60
    max_attempts: int = 3
    max_labels_per_request: int = 100

    @field_validator("home", "artifact_dir", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("database_url", "broker_url", mode="after")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # `UISPS_DATABASE_URL=` in a .env or compose file means "use the default", not "".
        return value or None

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
    def effective_artifact_dir(self) -> Path:
        return self.artifact_dir if self.artifact_dir is not None else self.home / "artifacts"


def get_settings() -> Settings:
    """Build settings from the current environment (fresh each call; tests change the env)."""
    return Settings()


@lru_cache(maxsize=1)
def cached_settings() -> Settings:
    """Settings read once per process, for hot paths such as FastAPI dependencies."""
    return Settings()
