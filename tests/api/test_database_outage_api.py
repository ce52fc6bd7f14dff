"""PostgreSQL stops while clients poll: every answer is a 503 problem (never a 500), and the service
resumes by itself when the database is back.

Stopping the shared test cluster would break tests running beside this one, so the test starts a
PostgreSQL of its own (initdb + pg_ctl on a free port in a temporary folder) and stops and
restarts that. The API runs as it does in production: `uisps serve` (uvicorn) in a subprocess.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from uisps.client import UispsClient
from uisps.demo import model_spec_of
from uisps.local import LocalService, create_api_key, free_port

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _postgres_bin() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


@dataclass
class PrivatePostgres:
    bin: Path
    data: Path
    port: int
    as_user: list[str]  # prefix that runs a command as the postgres user when we are root

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="uisps-private-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and there is no 'postgres' user to run a private PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PrivatePostgres(binaries, root / "data", free_port(), as_user)
    try:  # a failed start leaves neither a postmaster nor its folder behind
        subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        server.start()
        yield server
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Poller:
    """A client polling one URL until told to stop, keeping every status (and any 500 body)."""

    http: httpx.Client
    path: str
    statuses: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    last: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                response = self.http.get(self.path, timeout=15)
            except httpx.TransportError as exc:  # the API itself must stay up
                self.bad.append(f"transport error: {exc!r}")
                continue
            self.last = response.status_code
            self.statuses[response.status_code] += 1
            if response.status_code == 503:
                problem = response.json()
                ok = (response.headers["content-type"] == "application/problem+json" and response.headers.get("retry-after")
                      and problem["code"] == "database_unavailable")
                if not ok:
                    self.bad.append(response.text)
            elif response.status_code != 200:
                self.bad.append(f"{response.status_code}: {response.text}")
            time.sleep(0.2)  # within the key's rate limit (the pollers share one key)


def _wait(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_database_outage_is_503_for_pollers_and_the_service_resumes_by_itself(
    private_postgres: PrivatePostgres, tmp_path: Path, digits_checkpoint: bytes
) -> None:
    env = {**SINGLE_THREAD_ENV, "UISPS_DATABASE_URL": private_postgres.url}
    log = tmp_path / "server.log"
    with log.open("wb") as log_file, LocalService(tmp_path / "home", env=env, worker=False, log=log_file) as service:
        with UispsClient(service.url) as anonymous:
            anonymous.wait_ready(120, alive=service.alive)
        admin = create_api_key(service.home, "admin", env=env)
        compliance = create_api_key(service.home, "compliance", env=env)
        with UispsClient(service.url, api_key=admin) as admin_client, UispsClient(service.url, api_key=compliance) as client:
            model = admin_client.create_model(model_spec_of(digits_checkpoint, "outage"))
            admin_client.upload_version(model["id"], digits_checkpoint)
            request = client.create_deletion_request(model["id"], [3])
            pollers = [Poller(client.http, f"/deletion-requests/{request['id']}"), Poller(client.http, "/models")]
            threads = [threading.Thread(target=p.run, daemon=True) for p in pollers]
            for thread in threads:
                thread.start()
            try:
                _wait(lambda: all(p.statuses[200] for p in pollers), 30, "the pollers' first answers")

                private_postgres.stop()
                _wait(lambda: all(p.last == 503 for p in pollers), 30, "503s during the outage")
                time.sleep(1.0)  # a few more polls into the outage
                during = client.http.post("/deletion-requests", json={"model_id": model["id"], "forget_labels": [4]})
                ready = client.http.get("/readyz")
                healthy = client.http.get("/healthz")

                private_postgres.start()
                _wait(lambda: all(p.last == 200 for p in pollers), 60, "the service to resume")
            finally:
                for poller in pollers:
                    poller.stop.set()
                for thread in threads:
                    thread.join(30)

            assert during.status_code == 503 and during.json()["code"] == "database_unavailable", during.text
            assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
            assert healthy.status_code == 200
            for poller in pollers:
                assert poller.bad == [], poller.bad[:3]
                assert set(poller.statuses) == {200, 503}, poller.statuses
            # Back to normal, without a restart: reads and writes.
            assert client.get_deletion_request(request["id"])["state"] == "queued"
            assert client.create_deletion_request(model["id"], [4])["state"] == "queued"
    assert "unhandled error" not in log.read_text(errors="replace")  # what a 500 would have logged
