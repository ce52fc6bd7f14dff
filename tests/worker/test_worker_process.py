"""What the worker's parent process (and the API) import."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from core.settings import Settings


def test_torch_stays_out_of_the_api_and_the_worker_parent() -> None:
    # CUDA must only ever be initialised in the pool child, and the API never needs torch to start.
    code = (
        "import sys, api.app, worker.celery_app, worker.tasks, worker.main, worker.context, worker.reconciler, uisps.cli\n"
        "api.app.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'core.workflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_worker_without_the_gpu_it_is_told_to_use_does_not_start(tmp_path) -> None:  # noqa: ANN001
    import os

    env = {**os.environ, "UISPS_HOME": str(tmp_path), "UISPS_DEVICE": "cuda:99"}
    worker = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120)

    assert worker.returncode != 0
    assert "worker not started: device 'cuda:99': this machine has" in worker.stderr
    assert not any(tmp_path.iterdir())  # it took nothing off any queue: no broker was even created


def test_a_worker_with_a_misspelt_setting_does_not_start(tmp_path) -> None:  # noqa: ANN001
    import os

    # Unnoticed, the worker would use the embedded SQLite database and drop every message it took.
    env = {**os.environ, "UISPS_HOME": str(tmp_path), "UISPS_DATABSE_URL": "postgresql+psycopg://db/uisps"}
    worker = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120)

    assert worker.returncode != 0
    assert "worker not started: unknown setting UISPS_DATABSE_URL (did you mean UISPS_DATABASE_URL?)" in worker.stderr
    assert not any(tmp_path.iterdir())


def test_a_worker_on_a_database_not_migrated_to_its_schema_does_not_start(own_pg_database: str, tmp_path) -> None:  # noqa: ANN001
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("UISPS_")}
    env |= {"UISPS_HOME": str(tmp_path), "UISPS_DATABASE_URL": own_pg_database}
    worker = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120)

    assert worker.returncode != 0
    assert "worker not started: the database" in worker.stderr and "is at revision None, not " in worker.stderr
    assert "`uisps db upgrade` migrates it" in worker.stderr


@pytest.mark.parametrize(("shift_s", "refused"), [(-60, "60 s behind"), (45, "45 s ahead of"), (-5, None)])
def test_a_worker_whose_clock_is_off_the_database_s_by_more_than_a_quarter_lease_does_not_start(
    own_pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift_s: float, refused: str | None,
) -> None:
    # Its leases (its own time + 120 s) would read as expired to the others, or theirs to it.
    from core.db import utcnow
    from core.db.migrate import upgrade
    from worker.main import check_configuration

    upgrade(own_pg_database)
    monkeypatch.setattr("core.db.clock.utcnow", lambda: utcnow() + timedelta(seconds=shift_s))
    settings = Settings(home=tmp_path, database_url=own_pg_database, job_lease_s=120)

    if refused is None:
        check_configuration(settings)
    else:
        with pytest.raises(SystemExit, match=f"worker not started: this machine's clock is {refused}"):
            check_configuration(settings)


def test_a_worker_logs_at_the_level_its_settings_name(tmp_path) -> None:  # noqa: ANN001
    # an operator's UISPS_LOG_LEVEL=DEBUG (or WARNING) in the workers' environment must reach them
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("UISPS_")},
           "UISPS_HOME": str(tmp_path), "UISPS_LOG_LEVEL": "DEBUG", "UISPS_LOG_FORMAT": "text"}
    cli = [sys.executable, "-m", "uisps"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    with subprocess.Popen([*cli, "worker", "--pool", "solo"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as worker:
        try:
            lines = []
            for line in worker.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if " ready." in line:
                    break
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    assert any(" ready." in line for line in lines), "".join(lines)
    assert any(" DEBUG celery." in line for line in lines), "".join(lines)
