"""`uisps db ...` and `uisps demo`, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uisps.local import service_env

SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see conftest.py


def _uisps(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = service_env(home, SINGLE_THREAD_ENV) | {"COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "uisps", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_db_upgrade_and_downgrade(tmp_path: Path) -> None:
    assert _uisps(tmp_path, "db", "upgrade").stdout.strip() == "database at revision 0010"
    assert _uisps(tmp_path, "db", "downgrade").stdout.strip() == "database at revision 0009"
    assert _uisps(tmp_path, "db", "downgrade", "--revision", "base").stdout.strip() == "database at revision None"

    refused = _uisps(tmp_path, "db", "downgrade", "--revision", "nonsense")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: Can't locate revision identified by 'nonsense'"
    typo = _uisps(tmp_path, "db", "upgrade", "--revision", "nonsense")  # the user's typo, not a newer database
    assert typo.returncode == 2 and typo.stderr.strip() == "error: Can't locate revision identified by 'nonsense'"


def test_serve_refuses_a_misspelt_setting_before_touching_any_database(tmp_path: Path) -> None:
    env = service_env(tmp_path, SINGLE_THREAD_ENV) | {"UISPS_BROKR_URL": "redis://broker:6379/0"}
    served = subprocess.run([sys.executable, "-m", "uisps", "serve", "--port", "9"], env=env, capture_output=True,
                            text=True, timeout=60)

    assert served.returncode == 2
    assert served.stderr.strip() == "error: not started: unknown setting UISPS_BROKR_URL (did you mean UISPS_BROKER_URL?)"
    assert not any(tmp_path.iterdir())


def test_serve_stops_when_its_worker_cannot_run_rather_than_accept_requests_it_never_runs(tmp_path: Path) -> None:
    from uisps.local import free_port

    env = service_env(tmp_path, SINGLE_THREAD_ENV) | {"UISPS_DEVICE": "cuda:99"}  # a GPU no machine has
    # at --log-level error: why it stopped is said even where nothing else is
    served = subprocess.run([sys.executable, "-m", "uisps", "serve", "--port", str(free_port()), "--log-level", "error"],
                            env=env, capture_output=True, text=True, timeout=180)

    assert served.returncode == 2, served.stderr
    assert "worker not started" in served.stderr and "UISPS_DEVICE=cuda:99" in served.stderr
    assert "error: stopped: the worker exited (status 1)" in served.stderr


def _serve_until_up(home: Path, *args: str) -> str:
    """`uisps serve --no-worker ...` until it answers /healthz, then stopped as Ctrl+C would; its stderr."""
    import signal
    import time

    import httpx

    from uisps.local import free_port

    port = free_port()
    served = subprocess.Popen([sys.executable, "-m", "uisps", "serve", "--no-worker", "--port", str(port), *args],
                              env=service_env(home, SINGLE_THREAD_ENV), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline, up = time.monotonic() + 60, False
        while not up and time.monotonic() < deadline and served.poll() is None:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                pass
            if not up:
                time.sleep(0.2)
        served.send_signal(signal.SIGINT)
        stderr = served.communicate(timeout=30)[1]
        assert up, f"serve {' '.join(args)} never answered /healthz:\n{stderr[-3000:]}"
        return stderr
    finally:
        if served.poll() is None:
            served.kill()


def test_serve_log_level_quiets_the_api_s_start_up(tmp_path: Path) -> None:
    by_default = _serve_until_up(tmp_path / "default")
    quiet = _serve_until_up(tmp_path / "quiet", "--log-level", "error")

    for line in ("no API keys exist yet", "Started server process"):  # the API's WARNING, uvicorn's INFO
        assert line in by_default, by_default
        assert line not in quiet, quiet


@pytest.mark.parametrize("command", [("serve", "--port", "9"), ("db", "upgrade")])
def test_starting_on_a_database_a_newer_release_migrated_says_how_to_roll_back(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    import sqlite3

    assert _uisps(tmp_path, "db", "upgrade").returncode == 0
    with sqlite3.connect(tmp_path / "uisps.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")  # what a later release leaves

    started = _uisps(tmp_path, *command)  # `db upgrade`: compose's migrate service

    assert started.returncode == 2 and "Traceback" not in started.stderr
    assert started.stderr.startswith("error: Can't locate revision identified by '0099': a newer release")
    assert "uisps db downgrade --revision" in started.stderr


def test_the_demo_forgets_a_digit_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    result = _uisps(home, "demo", "--fast", "--home", str(home), "--forget", "7", timeout=300)

    assert result.returncode == 0, result.stderr[-3000:] + (home / "demo-server.log").read_text()[-3000:]
    assert "Forgetting digit 7" in result.stdout and "A_Df %" in result.stdout
    a_df_after = float(result.stdout.split("A_Df %")[1].split()[3])
    assert a_df_after <= 1.0, result.stdout
    assert "verified against the header and the version resource" in result.stdout
    assert "version 1 checkpoint purged at" in result.stdout  # v1 still knew digit 7
    kept = [path for path in (home / "artifacts").rglob("*") if path.is_file()]
    assert len(kept) == 1 and result.stdout.count(kept[0].name) == 1  # --home keeps version 2 only


def test_a_failed_demo_keeps_its_temporary_home_for_the_server_log(tmp_path: Path) -> None:
    # The demo's server ignores this shell's UISPS_* settings, so the failure is planted in every
    # Python process at start-up: an upload limit the flow cannot work under (the checkpoint is 413).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['UISPS_MAX_UPLOAD_BYTES'] = '1024'\n")
    env = service_env(tmp_path / "unused", SINGLE_THREAD_ENV) | {"PYTHONPATH": str(site), "TMPDIR": str(tmp_path)}
    env.pop("UISPS_HOME")
    result = subprocess.run([sys.executable, "-m", "uisps", "demo", "--fast"], env=env, capture_output=True, text=True,
                            timeout=300)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    kept = [path for path in tmp_path.iterdir() if path.name.startswith("uisps-demo-")]
    assert len(kept) == 1 and f"kept UISPS_HOME={kept[0]}" in result.stderr.replace("\n", "")
    assert (kept[0] / "demo-server.log").is_file()
