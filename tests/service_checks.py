"""What a test does when a service it needs (PostgreSQL, Redis, moto's S3 server) is not there."""

from __future__ import annotations

import os

import pytest

# CI sets it: there a service that does not answer is a broken run, not hundreds of quiet skips.
REQUIRE_SERVICES = os.environ.get("UISPS_TEST_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
    """Skip with the reason, or fail under UISPS_TEST_REQUIRE_SERVICES=1."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (UISPS_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)
