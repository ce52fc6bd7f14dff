"""A real S3-compatible server (moto's, in a subprocess) for the stores, the services and the API
that use them; fixtures that tests/conftest.py makes every test's. The tests that ask for it skip,
with the reason, when moto's server is not installed or does not start (fail, under CI's
UISPS_TEST_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_checks import unavailable

SERVER_START_TIMEOUT_S = 30.0
# Fake credentials for the fake server; boto3 refuses to sign without some.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _moto_server_command() -> list[str] | None:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script)]
    found = shutil.which("moto_server")
    return [found] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once the port accepts connections, else why it never did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"moto_server exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return None
        except OSError:
            time.sleep(0.1)
    return f"moto_server did not listen on port {port} within {timeout_s:.0f} s"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    command = _moto_server_command()
    if command is None:
        unavailable("moto's server is not installed (pip install 'moto[server]')")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    env = {**os.environ, **FAKE_CREDENTIALS}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        problem = _wait_for_port(port, process, SERVER_START_TIMEOUT_S)
        if problem is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            unavailable(f"{problem}; its log ends with:\n{tail}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only the fake credentials: never a developer's profile or real keys.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def bucket(s3_endpoint: str, aws_env: None) -> str:
    """A new, empty bucket for this test."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]')")
    name = f"uisps-test-{secrets.token_hex(6)}"
    boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
