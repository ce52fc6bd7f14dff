"""The code version recorded in job reports and deletion certificates."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE = "uisps-service"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>`` plus ``+g<commit>`` (and ``.dirty``) when run from a git checkout.

    ``UISPS_CODE_VERSION`` overrides it, for images built without their .git folder.
    """
    override = os.environ.get("UISPS_CODE_VERSION")
    if override:
        return override
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = _git_describe()
    return f"{version}+g{commit}" if commit else version


def _git_describe() -> str | None:
    if not (_REPO_ROOT / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "describe", "--always", "--dirty=.dirty", "--abbrev=12", "--exclude=*"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None
