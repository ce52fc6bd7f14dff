"""`uisps bench api`: a short load run against the API on PostgreSQL + Redis writes its results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from uisps.bench_api import NAGLE_SUSPECT_MS

REPO = Path(__file__).resolve().parents[2]
PHASE_KEYS = {
    "name", "method", "path", "concurrency", "duration_s", "requests", "requests_per_second",
    "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "errors", "error_samples", "status_counts",
    "client_cpu_percent_of_one_core", "cpu", "database_sessions_opened", "connections_per_worker", "target_rps",
}
TOP_KEYS = {"benchmark", "device", "host", "cpu_count", "database", "server", "client", "phases", "goal"}


def test_short_run_writes_every_key_without_errors(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    # A fresh database on pg_url's server (created and dropped by the bench), not pg_url itself:
    # the bench leaves queued requests behind, which other tests' worker sweeps would find.
    admin = make_url(pg_url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UISPS_")} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "uisps", "bench", "api", "--duration", "2", "--concurrency", "4", "--rate", "100",
         "--admin-url", admin, "--broker-url", redis_url, "--out", str(tmp_path / "results")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GET /deletion-requests/{id}" in run.stdout  # the Markdown summary is printed

    result = json.loads((tmp_path / "results" / "api-bench-cpu.json").read_text())
    assert TOP_KEYS <= result.keys()
    assert result["cpu_count"] >= 1 and result["database"].startswith("PostgreSQL")
    assert result["server"]["workers"] >= 2 and result["server"]["celery_worker"] is False
    # `uisps serve` as production runs it: uvloop gives every connection TCP_NODELAY, so a kept-alive
    # request does not wait ~40 ms for Nagle's algorithm (what asyncio + --workers would do).
    assert result["server"]["command"].startswith("uisps serve --no-worker")
    assert result["server"]["loop"] == "uvloop" and result["server"]["http"] == "httptools"
    # Nagle's algorithm would hold each kept-alive answer ~40 ms: far above any machine's own latency
    assert 0 < result["keepalive_healthz_p50_ms"] < NAGLE_SUSPECT_MS
    assert [p["name"] for p in result["phases"]] == ["get", "get_at_rate", "create"]
    for phase in result["phases"]:
        assert PHASE_KEYS <= phase.keys(), phase
        assert phase["errors"] == 0, phase["error_samples"]
        assert phase["concurrency"] == 4 and phase["requests"] > 0 and phase["requests_per_second"] > 0
        assert 0 < phase["p50_ms"] <= phase["p90_ms"] <= phase["p99_ms"] <= phase["max_ms"]
    assert result["phases"][0]["duration_s"] == 2 and result["phases"][0]["status_counts"].keys() == {"200"}
    # open loop: the requests go out on a schedule of the asked rate, never faster, however fast the
    # server answers (how close it gets to the rate is a figure of this machine, not checked here)
    at_rate = result["phases"][1]
    assert at_rate["target_rps"] == 100 and at_rate["requests"] <= 100 * at_rate["duration_s"] + at_rate["concurrency"]
    # ... and it does send them: a loop that lost its schedule would send a fraction (how close it
    # comes to the rate is a figure of the machine; half of it is within any machine's reach)
    assert at_rate["requests"] >= 0.5 * 100 * at_rate["duration_s"]
    assert result["phases"][0]["target_rps"] is None  # closed loop: as fast as the server answers
    assert result["phases"][2]["status_counts"].keys() == {"202"}
    # judged at the goal's rate only: this run's 100/s cannot meet 1000/s
    assert result["goal"]["phase"] == "get" and isinstance(result["goal"]["met"], bool)
    assert (tmp_path / "results" / "api-bench-cpu.md").read_text().startswith("# API load")

    # The bench cleaned up: its database is gone, and the broker's Redis database is empty.
    with psycopg.connect(admin, autocommit=True) as connection:
        left = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_bench_database(run.stderr),))
        assert left.fetchone() is None
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def _bench_database(log: str) -> str:
    """The name of the database the bench made, from its 'created database <name>' line."""
    for line in log.splitlines():
        if line.startswith("created database "):
            return line.split()[-1]
    raise AssertionError(f"no 'created database' line in:\n{log}")
