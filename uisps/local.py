"""Run the service locally as subprocesses: `uisps serve` (API + worker) on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from uisps.lifeline import tied_to_this_process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(home: Path, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with UISPS_HOME set and embedded defaults unless overridden:
    every UISPS_* setting of this shell is left out (an operator's database, bucket, signing key
    or GPU must not be used, or written, by a local run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UISPS_")}
    env["UISPS_HOME"] = str(home)
    env.update(overrides or {})
    return env


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """Ask a child to stop (`sig`), wait up to `grace_s`, then kill it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create_api_key(
    home: Path, role: str, *, tenant: str = "default", name: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """An API key for the service of `home` (its database migrated first), made in this process."""
    from core.db import make_engine, make_sessionmaker
    from core.db.migrate import upgrade
    from core.services.api_keys.service import api_key_service
    from core.settings import Settings

    overrides = env or {}
    # Constructed, not read from this shell: its UISPS_* are the operator's, not the local service's
    # (an incomplete one, UISPS_ARTIFACT_BACKEND=s3 without a bucket, would stop a demo here).
    settings = Settings.model_construct(home=Path(home), database_url=overrides.get("UISPS_DATABASE_URL"))
    url = settings.effective_database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            created = api_key_service.create(
                session, tenant_id=tenant, role=role, name=name or f"local {role}", actor="local"
            )
            return created.secret
    finally:
        engine.dispose()


class LocalService:
    """`uisps serve` in a subprocess: the API on 127.0.0.1:<port> plus (by default) a worker."""

    def __init__(
        self,
        home: Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        worker: bool = True,
        log: IO[bytes] | None = None,
    ) -> None:
        self.home = Path(home)
        self.env = service_env(self.home, env)
        self.port = port or free_port()
        self.worker = worker
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_api_key(self, role: str, *, tenant: str = "default", name: str | None = None) -> str:
        return create_api_key(self.home, role, tenant=tenant, name=name, env=self.env)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> LocalService:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "uisps", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if not self.worker:
            command.append("--no-worker")
        self.process = subprocess.Popen(
            tied_to_this_process(command), env=self.env, stdout=self.log or subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        # SIGINT, like Ctrl+C: uvicorn shuts down, then `serve` stops its worker.
        stop_process(self.process, grace_s, signal.SIGINT)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
