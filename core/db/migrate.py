"""Run the Alembic migrations programmatically (used by `uisps db ...`, start-up and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import URL

import migrations
from core.db.session import make_engine

MIGRATIONS_DIR = Path(migrations.__file__).parent
# pg_advisory_xact_lock key that schema upgrades take (migrations/env.py): one-key advisory locks
# are a space apart from the two-key ones of the audit chain and the artifacts.
MIGRATION_LOCK_ID = 0x75697370_6D696772 & 0x7FFF_FFFF_FFFF_FFFF


def alembic_config(url: str | URL) -> Config:
    """An Alembic config for ``url`` built without an ini file, so logging is left alone."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if isinstance(url, URL):
        url = url.render_as_string(hide_password=False)
    # ConfigParser interpolates '%', which appears in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | URL, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | URL) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def schema_problem(url: str | URL) -> str | None:
    """Why the database at `url` is not one the service can run on now, and what to do about it
    (None when it is at head).

    Read-only: an embedded SQLite file that does not exist is reported, not created.
    """
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url

    parsed = make_url(url) if isinstance(url, str) else url
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return f"there is no database at {shown}"
    revision = current_revision(parsed)
    scripts = ScriptDirectory.from_config(alembic_config(parsed))
    head = scripts.get_current_head()
    if revision == head:
        return None
    if revision is not None and not _known(scripts, revision):
        # An upgrade cannot help (and fails): the way back is the newer release's downgrade.
        return (f"the database {shown} is at revision {revision}, which this release does not know: a newer release "
                f"migrated it; downgrade it with that release (`uisps db downgrade --revision {head}`) first")
    return f"the database {shown} is at revision {revision}, not {head}; `uisps db upgrade` migrates it"


def _known(scripts: Any, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except Exception:  # alembic's ResolutionError for a revision none of its scripts define
        return False
