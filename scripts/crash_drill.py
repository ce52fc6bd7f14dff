#!/usr/bin/env python
"""Crash drill: kill -9 a worker in the middle of a deletion request, start a new one, and check the
request still finishes with exactly one new version. Repeats it --runs times and prints the tally.

    python scripts/crash_drill.py --runs 10
    python scripts/crash_drill.py --runs 3 --database-url postgresql+psycopg://... --broker-url redis://...

Each run: queue a request (tiny digits model, fast parameters), start `python -m worker`, wait until
the job reaches --kill-at (a stage), SIGKILL the worker's whole process group (parent and pool
child), start a second worker, and wait. The second worker's reconciler finds the request running
under an expired lease (the dead worker's heartbeat stopped), sends it again, and the request is
taken over (attempt 2). The run passes when the request succeeded, exactly one version names it,
and the tenant's audit chain is intact. Exit status 0 when every run passed.

Settings used by the workers: a short lease (--lease-s, default 4 s) and a reconciler pass every
second, so a takeover takes seconds instead of the production default of about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from core.db import DeletionRequest, ModelVersion, make_engine, make_sessionmaker, verify_chain  # noqa: E402
from core.db.migrate import upgrade  # noqa: E402
from core.services.deletion_requests.service import deletion_request_service  # noqa: E402
from core.services.models.service import ModelSpec, model_service  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.storage import make_artifact_store  # noqa: E402
from uisps.lifeline import tied_to_this_process  # noqa: E402
from core.broker import make_celery, send_deletion_request  # noqa: E402

TENANT = "crash-drill"
FAST_PARAMS: dict[str, Any] = {"inversion": {"iterations": 200}, "lr": 0.1, "batch_size": 64, "precision": "fp32"}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class RunResult:
    run: int
    request_id: str
    passed: bool
    state: str
    attempts: int
    versions_for_request: int
    killed_at_stage: str | None
    seconds_to_finish_after_kill: float | None
    problem: str | None = None


class Drill:
    def __init__(self, home: Path, env: dict[str, str], settings: Settings, timeout_s: float, kill_at: str) -> None:
        self.home = home
        self.env = env
        self.settings = settings
        self.timeout_s = timeout_s
        self.kill_at = kill_at
        self.kill_progress = _phase_start(kill_at)
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.celery = make_celery(settings)
        self.worker_logs = home / "workers.log"

    def close(self) -> None:
        self.celery.close()
        self.engine.dispose()

    def register(self, checkpoint: bytes) -> str:
        from uisps.demo import model_spec_of

        spec = ModelSpec(**model_spec_of(checkpoint, f"drill-{uuid.uuid4().hex[:8]}"))
        with self.sessions() as session:
            model = model_service.create(session, tenant_id=TENANT, actor="crash-drill", spec=spec)
            session.commit()
            model_service.upload_version(
                session, tenant_id=TENANT, actor="crash-drill", model_id=model.id, checkpoint=checkpoint,
                store=make_artifact_store(self.settings), max_bytes=len(checkpoint),
            )
            session.commit()
            return model.id

    def run(self, number: int, model_id: str, label: int) -> RunResult:
        with self.sessions() as session:
            request = deletion_request_service.create(
                session, tenant_id=TENANT, actor="crash-drill", settings=self.settings, model_id=model_id,
                forget_labels=[label], base_version=1, params=FAST_PARAMS,
                dispatch=lambda request_id, priority: send_deletion_request(self.celery, request_id, priority),
            )
            session.commit()  # sends it to the broker
            request_id = request.id
        first = self._start_worker()
        second = None
        killed_at_stage = None
        try:
            # At the stage, or past its start if a short stage went by between two polls.
            row = self._wait(
                request_id,
                lambda r: r.state in TERMINAL
                or (r.state == "running" and (r.stage == self.kill_at or r.progress >= self.kill_progress)),
            )
            if row.state in TERMINAL:
                return self._result(number, request_id, None, None, f"finished before reaching {self.kill_at!r}")
            killed_at_stage = row.stage
            os.killpg(first.pid, signal.SIGKILL)  # the parent and its pool child, no warning
            first.wait(30)
            killed = time.monotonic()
            second = self._start_worker()
            self._wait(request_id, lambda r: r.state in TERMINAL)
            return self._result(number, request_id, killed_at_stage, time.monotonic() - killed, None)
        except TimeoutError as exc:
            return self._result(number, request_id, killed_at_stage, None, str(exc))
        finally:
            for worker in (first, second):
                _stop(worker)

    def _result(
        self, number: int, request_id: str, stage: str | None, seconds: float | None, problem: str | None
    ) -> RunResult:
        with self.sessions() as session:
            request = session.get(DeletionRequest, request_id)
            versions = session.scalar(
                select(func.count()).select_from(ModelVersion).where(ModelVersion.deletion_request_id == request_id)
            )
            chain = verify_chain(session, TENANT)
        if problem is None and request.state != "succeeded":
            problem = f"the request {request.state}: {request.error}"
        if problem is None and versions != 1:
            problem = f"{versions} versions name the request"
        if problem is None and chain is not None:
            problem = f"audit chain broken at {chain}"
        if problem is None and request.attempts < 2:
            problem = f"attempts is {request.attempts}: the killed attempt was not taken over"
        return RunResult(number, request_id, problem is None, request.state, request.attempts, versions, stage,
                         round(seconds, 1) if seconds is not None else None, problem)

    def _wait(self, request_id: str, done: Any) -> DeletionRequest:
        deadline = time.monotonic() + self.timeout_s
        while True:
            with self.sessions() as session:
                row = session.get(DeletionRequest, request_id)
                if done(row):
                    return row
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} still {row.state}/{row.stage} after {self.timeout_s:.0f} s")
            time.sleep(0.1)

    def _start_worker(self) -> subprocess.Popen[bytes]:
        with self.worker_logs.open("ab") as log:
            return subprocess.Popen(
                tied_to_this_process([sys.executable, "-m", "worker", "--loglevel=INFO"]), cwd=ROOT, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,  # its own process group, to kill it whole
            )


def _phase_start(stage: str) -> float:
    """The overall progress at which `stage` starts (worker.jobs.PHASES; the first evaluation)."""
    from worker.jobs import PHASES

    start = 0.0
    for name, weight in PHASES:
        if name.split(":")[0] == stage:
            return start
        start += weight
    raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(dict.fromkeys(n.split(':')[0] for n, _ in PHASES))}")


def _stop(worker: subprocess.Popen[bytes] | None) -> None:
    if worker is None or worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)  # warm shutdown
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def _checkpoint(path: Path | None) -> bytes:
    if path is not None and path.exists():
        return path.read_bytes()
    import torch

    from uisps.demo import train_digits_checkpoint

    torch.set_num_threads(1)
    data = train_digits_checkpoint()
    if path is not None:
        path.write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--database-url", help="default: SQLite in a temporary UISPS_HOME")
    parser.add_argument("--broker-url", help="default: the embedded SQLite broker")
    parser.add_argument("--checkpoint", type=Path, help="a digits smallcnn checkpoint (trained and saved here when missing)")
    parser.add_argument("--lease-s", type=float, default=4.0)
    parser.add_argument("--kill-at", default="inversion", help="the stage at which the worker is killed")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per wait")
    parser.add_argument("--json", action="store_true", help="one JSON line per run, then the tally")
    parser.add_argument("--keep", action="store_true", help="keep the temporary UISPS_HOME (kept anyway on failure)")
    parser.add_argument("--home", type=Path, help="an empty folder for UISPS_HOME instead of a temporary one")
    args = parser.parse_args(argv)

    if args.home is not None:
        args.home.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="uisps-crash-drill-", dir=args.home))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("UISPS_")},
        "UISPS_HOME": str(home),
        "UISPS_JOB_LEASE_S": str(args.lease_s),
        "UISPS_RECONCILE_INTERVAL_S": "1",
        "UISPS_REQUEUE_AFTER_S": "30",
        "UISPS_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    if args.database_url:
        env["UISPS_DATABASE_URL"] = args.database_url
    if args.broker_url:
        env["UISPS_BROKER_URL"] = args.broker_url
    settings = Settings(home=home, database_url=args.database_url, broker_url=args.broker_url,
                        job_lease_s=args.lease_s)
    upgrade(settings.effective_database_url)
    drill = Drill(home, env, settings, args.timeout_s, args.kill_at)
    results: list[RunResult] = []
    try:
        model_id = drill.register(_checkpoint(args.checkpoint))
        for number in range(1, args.runs + 1):
            result = drill.run(number, model_id, label=number % 10)
            results.append(result)
            if args.json:
                print(json.dumps(asdict(result)), flush=True)
            else:
                verdict = "ok  " if result.passed else "FAIL"
                detail = result.problem or (
                    f"killed at {result.killed_at_stage}, succeeded {result.seconds_to_finish_after_kill} s later "
                    f"on attempt {result.attempts}, {result.versions_for_request} version"
                )
                print(f"run {number:>3}: {verdict} {detail}", flush=True)
    finally:
        drill.close()
    passed = sum(r.passed for r in results)
    ok = passed == len(results) == args.runs
    kept = args.keep or not ok
    print(f"crash drill: {passed}/{len(results)} runs finished with exactly one version after a kill -9"
          + (f" (worker log: {drill.worker_logs})" if kept else ""), flush=True)
    if not kept:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
