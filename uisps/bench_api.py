"""`uisps bench api`: a bounded load run against the HTTP API on PostgreSQL, over loopback.

What it does, in order:

1. A fresh PostgreSQL database (created on the `admin_url` server, migrated with
   `core.db.migrate.upgrade`, dropped at the end) unless `database_url` is given, and a Redis
   database for the broker (an empty one it picks, or `broker_url`), emptied at the end.
2. API keys, made in this process with `api_key_service.create` exactly like
   `uisps keys create`: one admin key (setup) and `keys` compliance keys the load connections
   share (a compliance key may read and create deletion requests).
3. The API alone, as production runs it: `uisps serve --no-worker --workers W` (uvicorn with
   uvloop and httptools, see uisps.serving) in a subprocess on a free 127.0.0.1 port. No Celery
   worker: nothing runs, the run measures the HTTP and database path.
   The per-key rate limit stays on (every request takes a token from the broker's Redis, as in
   production) but is raised out of reach, and so is the per-tenant cap on active requests.
4. Setup over HTTP: a smallcnn model with a random-init version 1, and `seed_requests` deletion
   requests (they stay queued).
5. The load, from a second process (a `spawn` child running a minimal asyncio HTTP/1.1 keep-alive
   client, `concurrency` connections): a warm-up, then phase `get` (polls of
   `GET /deletion-requests/{id}` over random seeded ids, closed loop: each connection sends its
   next request when the last is answered, so the phase finds the most the service can answer)
   for `duration_s`; phase `get_at_rate`, the same polls sent open loop at a fixed `rate` (each
   request at its scheduled time, its latency counted from that time even when the server is
   behind, so a slow answer is not hidden by a late send: what a client population polling at
   that rate sees) for `duration_s`; then phase `create` (`POST /deletion-requests` with a fresh
   `Idempotency-Key`, as `uisps.client` sends, closed loop) for `create_duration_s`. Each phase
   reports req/s, latency percentiles and errors, and where the machine's CPU went (the client's
   own share included: on a 2-core box it competes with the server).

Linux only for the CPU breakdown (it reads /proc); the load itself runs anywhere.
This module imports only the standard library at the top: the load child stays light.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uisps.lifeline import tied_to_this_process

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
# Redis database numbers the bench may pick when no broker URL is given (the first empty one).
REDIS_DB_CANDIDATES = tuple(range(15, 0, -1))
TENANT = "bench"
GOAL_GET_RPS = 1000.0
GOAL_GET_P99_MS = 50.0
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
CONNECT_STAGGER_S = 0.02
# New database connections per second above which a phase is said to churn its pool.
CHURN_PER_S = 5.0
# A GET /healthz slower than this on a kept-alive connection means Nagle + delayed ACK (~40 ms).
NAGLE_SUSPECT_MS = 30.0
# "Never refused": the limit's code path runs (Redis buckets, as in production), its answer is always yes.
UNREACHABLE_RATE = "1000000000"
RESULT_NAME = "api-bench-cpu"
# Other processes using more than this many cores during a phase make the run's figures suspect.
OTHER_LOAD_WARNING_CORES = 0.25


class BenchError(Exception):
    """The benchmark could not be set up or run (one line for the command line)."""


@dataclass
class ApiBenchSetup:
    duration_s: float = 20.0
    concurrency: int = 32
    create_duration_s: float | None = None  # default: a quarter of duration_s, at least 1 s
    warmup_s: float = 2.0
    workers: int | None = None  # default: the number of cores, at least 2
    keys: int = 1  # compliance keys the connections share (connection i uses key i % keys)
    rate: float = GOAL_GET_RPS  # GET/s of the open-loop phase `get_at_rate` (0: no such phase)
    seed_requests: int = 50
    database_url: str | None = None  # default: a fresh database on admin_url's server
    admin_url: str = DEFAULT_ADMIN_URL
    broker_url: str | None = None  # default: an empty database number of DEFAULT_REDIS_URL
    access_log: bool = True  # the service's own access log (UISPS_ACCESS_LOG), on as in production
    seed: int = 0

    @property
    def effective_create_duration_s(self) -> float:
        if self.create_duration_s is not None:
            return self.create_duration_s
        return max(1.0, self.duration_s / 4)

    @property
    def effective_workers(self) -> int:
        return self.workers if self.workers else max(2, cpu_count())


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- The load: a minimal asyncio HTTP/1.1 client, run in a spawned child process -------------


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.status: dict[str, int] = {}
        self.errors = 0
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server closes the connection) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts), close
    body = await reader.readexactly(length) if length else b""
    return status, body, close


def _make_request_factory(spec: dict[str, Any], connection: int) -> Callable[[int], tuple[bytes, bytes | None]]:
    """For connection `connection`: n -> (request bytes, a fragment the body must contain)."""
    host = f"Host: {spec['host']}:{spec['port']}\r\n"
    auth = f"Authorization: Bearer {spec['keys'][connection % len(spec['keys'])]}\r\n"
    rng = random.Random(spec["seed"] * 100_003 + connection)
    if spec["phase"] in ("get", "get_at_rate"):
        ids = spec["ids"]
        prebuilt = [
            (
                f"GET /deletion-requests/{i} HTTP/1.1\r\n{host}{auth}Accept: application/json\r\n\r\n".encode(),
                f'"id":"{i}"'.encode(),
            )
            for i in ids
        ]
        return lambda _n: prebuilt[rng.randrange(len(prebuilt))]
    model_id, labels = spec["model_id"], spec["labels"]
    bodies = [json.dumps({"model_id": model_id, "forget_labels": [label]}).encode() for label in labels]
    prefix = f"POST /deletion-requests HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\n".encode()
    tag = f"bench-{os.getpid()}-{connection}-{secrets.token_hex(4)}"

    def post(n: int) -> tuple[bytes, bytes | None]:
        body = bodies[rng.randrange(len(bodies))]
        head = f"Idempotency-Key: {tag}-{n}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        return prefix + head + body, b'"state":"queued"'

    return post


async def _connection_loop(
    spec: dict[str, Any], connection: int, window: dict[str, float], stats: _Stats
) -> None:
    make = _make_request_factory(spec, connection)
    expected = spec["expect_status"]
    reader = writer = None
    n = 0
    perf = time.perf_counter
    # Connections open one after another, not all at once: a uvicorn worker accepts every
    # connection pending when it wakes, so a burst would all land on one worker and stay there
    # (keep-alive); arriving over time, they go to whichever worker is free to accept.
    await asyncio.sleep(connection * CONNECT_STAGGER_S)
    # Open loop (a `rate`): this connection's share of the requests, evenly spaced from now on.
    interval = spec["concurrency"] / spec["rate"] if spec.get("rate") else None
    first = perf()
    while True:
        start = perf()
        if interval is not None:
            scheduled = first + n * interval
            if scheduled > start:
                await asyncio.sleep(scheduled - start)
            start = scheduled  # behind schedule, the wait for the connection counts as latency
        if start >= window["end"]:
            break
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
            except OSError as exc:
                if start >= window["start"]:
                    stats.error(f"connect: {exc!r}")
                await asyncio.sleep(0.05)
                continue
            if interval is None:
                start = perf()
        request, fragment = make(n)
        n += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                writer.write(request)
                status, body, close = await _read_response(reader)  # type: ignore[arg-type]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            # OSError includes TimeoutError (a request over REQUEST_TIMEOUT_S)
            if start >= window["start"]:
                stats.error(f"transport: {exc!r}")
            writer.close()
            reader = writer = None
            continue
        end = perf()
        if start >= window["start"]:  # the warm-up is not counted
            stats.latencies.append(end - start)
            key = str(status)
            stats.status[key] = stats.status.get(key, 0) + 1
            if status != expected:
                stats.error(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            elif fragment is not None and fragment not in body:
                stats.error(f"unexpected body: {body[:200].decode(errors='replace')}")
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _run_load(spec: dict[str, Any], notify: Callable[[str], None]) -> dict[str, Any]:
    now = time.perf_counter()
    window = {"start": now + spec["warmup_s"], "end": now + spec["warmup_s"] + spec["duration_s"]}
    stats = _Stats()
    tasks = [asyncio.create_task(_connection_loop(spec, c, window, stats)) for c in range(spec["concurrency"])]
    await asyncio.sleep(max(0.0, window["start"] - time.perf_counter()))
    notify("start")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(max(0.0, window["end"] - time.perf_counter()))
    notify("end")
    cpu1, wall1 = time.process_time(), time.perf_counter()
    await asyncio.gather(*tasks)  # the requests in flight at the end finish (they were started in time)
    elapsed = max(time.perf_counter(), window["end"]) - window["start"]
    return _summary(stats, elapsed, (cpu1 - cpu0) / max(wall1 - wall0, 1e-9))


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _summary(stats: _Stats, elapsed_s: float, client_cpu_fraction: float) -> dict[str, Any]:
    ordered = sorted(stats.latencies)
    ms = lambda seconds: round(seconds * 1000, 2)  # noqa: E731
    return {
        "requests": len(ordered),
        "elapsed_s": round(elapsed_s, 3),
        "requests_per_second": round(len(ordered) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": ms(_percentile(ordered, 0.50)),
        "p90_ms": ms(_percentile(ordered, 0.90)),
        "p99_ms": ms(_percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1]) if ordered else float("nan"),
        "mean_ms": ms(sum(ordered) / len(ordered)) if ordered else float("nan"),
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "status_counts": dict(sorted(stats.status.items())),
        "client_cpu_percent_of_one_core": round(100 * client_cpu_fraction, 1),
    }


def _load_main(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of the load child: runs one phase and sends ("start"), ("end"), ("result", r)."""
    try:
        result = asyncio.run(_run_load(spec, lambda event: conn.send((event, None))))
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


# --- Where the CPU goes (Linux /proc) ----------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[str, int, float, float]]:
    """pid -> (command name, parent pid, CPU seconds used, CPU seconds of its reaped children),
    for every readable process."""
    table: dict[int, tuple[str, int, float, float]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        own = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        children = (int(fields[13]) + int(fields[14])) / _CLK_TCK
        table[int(entry)] = (name, int(fields[1]), own, children)
    return table


def _host_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def _background_busy_percent(seconds: float = 1.0) -> float | None:
    """How busy the machine is with nothing of the bench's running (its API idle)."""
    before = _host_cpu()
    time.sleep(seconds)
    after = _host_cpu()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def _connections_per_worker(server_pid: int, port: int) -> list[int]:
    """Established connections to `port` held by each uvicorn worker (Linux /proc), busiest first."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    processes = _proc_table()
    counts = []
    for pid in _descendants(processes, server_pid) - {server_pid}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" not in f.read():  # a uvicorn worker, not multiprocessing's tracker
                    continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        counts.append(sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes))
    return sorted(counts, reverse=True)


def _descendants(table: dict[int, tuple[str, int, float, float]], root: int) -> set[int]:
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (_, ppid, *_) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


class CpuMeter:
    """CPU seconds used between start() and stop() by the API, the client, PostgreSQL and Redis."""

    def __init__(self, server_pid: int, client_pid: int) -> None:
        self.server_pid, self.client_pid = server_pid, client_pid
        self.before: dict[int, tuple[str, int, float, float]] = {}
        self.host_before: tuple[float, float] | None = None
        self.t0 = 0.0

    def _groups(self, table: dict[int, tuple[str, int, float, float]]) -> dict[int, str]:
        api = _descendants(table, self.server_pid)
        groups = {}
        for pid, (name, *_) in table.items():
            if pid in api:
                groups[pid] = "api"
            elif pid == self.client_pid:
                groups[pid] = "client"
            elif name.startswith("postgres") or name.startswith("postmaster"):
                groups[pid] = "postgresql"
            elif name.startswith("redis"):
                groups[pid] = "redis"
        return groups

    def start(self) -> None:
        self.before, self.host_before, self.t0 = _proc_table(), _host_cpu(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        after, host_after, wall = _proc_table(), _host_cpu(), time.perf_counter() - self.t0
        groups = self._groups(after)
        # Each process's own CPU in the window, plus that of the children it reaped meanwhile
        # (PostgreSQL backends of closed connections live on only in the postmaster's count),
        # less what those children had used before the window started.
        spent: dict[int, float] = {}
        for pid, (name, _, own, children) in after.items():
            before = self.before.get(pid)
            if before and before[0] == name:
                spent[pid] = (own - before[2]) + (children - before[3])
            else:
                spent[pid] = own + children
        for pid, (_, parent, own, children) in self.before.items():
            if pid not in after and parent in spent:
                spent[parent] -= own + children
        used: dict[str, float] = {"api": 0.0, "client": 0.0, "postgresql": 0.0, "redis": 0.0}
        others: dict[str, float] = {}
        for pid, seconds in spent.items():
            if pid in groups:
                used[groups[pid]] += seconds
            elif seconds > 0:
                name = after[pid][0]
                others[name] = others.get(name, 0.0) + seconds
        result: dict[str, Any] = {
            "wall_s": round(wall, 2),
            "cores_used": {group: round(seconds / wall, 2) for group, seconds in used.items()},
        }
        result["cpu_s"] = {group: round(seconds, 3) for group, seconds in used.items()}
        top = sorted(others.items(), key=lambda item: -item[1])[:5]
        result["other_processes"] = {name: round(seconds / wall, 2) for name, seconds in top if seconds / wall >= 0.01}
        if self.host_before and host_after:
            busy = host_after[0] - self.host_before[0]
            total = host_after[1] - self.host_before[1]
            result["host_busy_percent"] = round(100 * busy / total, 1) if total > 0 else None
            # Whatever else ran meanwhile (other people's jobs on a shared machine): the figures
            # of a run where this is large understate what the service can do.
            result["cores_used"]["other"] = round(max(0.0, busy - sum(used.values())) / wall, 2)
            result["cores_used"]["everything"] = round(busy / wall, 2)
        return result


# --- Setup and teardown ------------------------------------------------------------------------


def _free_port() -> int:
    from uisps.local import free_port

    return free_port()


class _Database:
    """A fresh PostgreSQL database on the server of `admin_url`, dropped by drop()."""

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy.engine import make_url

        self.admin = make_url(admin_url).set(drivername="postgresql")
        self.name = f"uisps_bench_{os.getpid()}_{secrets.token_hex(4)}"
        self.url = self.admin.set(drivername="postgresql+psycopg", database=self.name).render_as_string(
            hide_password=False
        )

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.admin.render_as_string(hide_password=False), autocommit=True, connect_timeout=5)

    def create(self) -> None:
        import psycopg
        from psycopg import sql

        try:
            with self._connect() as admin:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"cannot reach PostgreSQL at {self.admin.render_as_string()}: {first}") from None

    def drop(self) -> None:
        from psycopg import sql

        with self._connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name)))


def _pick_redis_db(base_url: str) -> str:
    import redis

    for number in REDIS_DB_CANDIDATES:
        url = f"{base_url.rstrip('/')}/{number}"
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            if client.dbsize() == 0:
                return url
        except redis.ConnectionError as exc:
            raise BenchError(f"cannot reach Redis at {base_url}: {exc}") from None
        finally:
            client.close()
    raise BenchError(f"no empty Redis database among {REDIS_DB_CANDIDATES} at {base_url}; pass --broker-url")


def _flush_redis(url: str) -> None:
    import redis

    if not url.startswith(("redis://", "rediss://", "unix://")):
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


def _database_description(url: str) -> str:
    from sqlalchemy import text

    from core.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                return f"PostgreSQL {str(connection.execute(text('SHOW server_version')).scalar()).split()[0]}"
            return engine.dialect.name
    finally:
        engine.dispose()


def _create_keys(url: str, count: int) -> tuple[str, list[str]]:
    """(an admin key, `count` compliance keys) of tenant TENANT: api_key_service.create, as
    `uisps keys create --tenant bench --role ...` does."""
    from core.db import make_engine, make_sessionmaker
    from core.services.api_keys.service import api_key_service

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            admin = api_key_service.create(
                session, tenant_id=TENANT, role="admin", name="bench admin", actor="cli:bench"
            )
            compliance = [
                api_key_service.create(
                    session, tenant_id=TENANT, role="compliance", name=f"bench load {i}", actor="cli:bench"
                )
                for i in range(count)
            ]
            return admin.secret, [k.secret for k in compliance]
    finally:
        engine.dispose()


def _random_checkpoint() -> tuple[dict[str, Any], bytes]:
    """A POST /models body and a matching random-init smallcnn checkpoint (no training)."""
    from core.architectures import build_model
    from core.checkpoint import Manifest, checkpoint_bytes

    names = [str(i) for i in range(10)]
    manifest = Manifest(
        architecture="smallcnn", in_channels=1, num_classes=10, input_shape=[1, 8, 8], class_names=names,
        mean=[0.5], std=[0.25], data_source="digits",
    )
    spec = {
        "name": f"bench-{secrets.token_hex(4)}", "architecture": "smallcnn", "class_names": names,
        "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25], "data_source": "digits",
    }
    return spec, checkpoint_bytes(build_model("smallcnn", 1, 10), manifest)


class _Server:
    def __init__(self, home: Path, env: dict[str, str], workers: int) -> None:
        self.home, self.env, self.workers = home, env, workers
        self.port = _free_port()
        self.log_path = home / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def arguments(self) -> list[str]:
        """`uisps serve` as docker-compose runs it, on this bench's port."""
        return ["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--log-level", "warning"]

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "uisps", *self.arguments]

    @staticmethod
    def shown_command(workers: int) -> str:
        return f"uisps serve --no-worker --host 127.0.0.1 --port <free port> --workers {workers} --log-level warning"

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(tied_to_this_process(self.command), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise BenchError(f"the API exited during start-up:\n{self.log_tail()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise BenchError(f"the API was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        from uisps.local import stop_process

        stop_process(self.process, 30.0, signal.SIGTERM)

    def uvicorn_implementations(self) -> dict[str, str]:
        """The event loop and HTTP parser `uisps serve` picks in this environment."""
        from uisps.serving import implementations

        return implementations()


def _keepalive_probe(url: str, count: int = 20) -> float:
    """Median ms of sequential GET /healthz on one kept-alive connection (no database work)."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=10) as client:
        client.get("/healthz")  # connects
        for _ in range(count):
            start = time.perf_counter()
            client.get("/healthz")
            times.append(time.perf_counter() - start)
    return round(1000 * sorted(times)[count // 2], 2)


def _seed(url: str, admin_key: str, compliance_key: str, count: int) -> tuple[str, list[str], list[int]]:
    """(model id, `count` queued deletion request ids, labels a create may ask for)."""
    import httpx

    spec, checkpoint = _random_checkpoint()
    with httpx.Client(base_url=url, timeout=60) as client:
        admin = {"Authorization": f"Bearer {admin_key}"}
        response = client.post("/models", json=spec, headers=admin)
        if response.status_code != 201:
            raise BenchError(f"POST /models answered {response.status_code}: {response.text[:500]}")
        model_id = response.json()["id"]
        files = {"file": ("bench.safetensors", checkpoint, "application/octet-stream")}
        response = client.post(f"/models/{model_id}/versions", files=files, headers=admin)
        if response.status_code != 201:
            raise BenchError(f"POST /models/{{id}}/versions answered {response.status_code}: {response.text[:500]}")
        labels = list(range(9))  # any one label but the last: never "every class"
        ids = []
        compliance = {"Authorization": f"Bearer {compliance_key}"}
        for i in range(count):
            body = {"model_id": model_id, "forget_labels": [labels[i % len(labels)]], "external_ref": f"bench-{i}"}
            response = client.post("/deletion-requests", json=body, headers=compliance)
            if response.status_code != 202:
                raise BenchError(f"POST /deletion-requests answered {response.status_code}: {response.text[:500]}")
            ids.append(response.json()["id"])
    return model_id, ids, labels


class _SessionCounter:
    """New PostgreSQL connections to the bench's database (pg_stat_database.sessions, PG 14+).

    Many per second under a steady load means connection churn: the API's pool discards the
    connections it opened above its pool_size, and every new one costs a backend fork and a login.
    """

    def __init__(self, url: str) -> None:
        self.connection = None
        try:
            import psycopg
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            if parsed.get_backend_name() == "postgresql":
                conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
                self.connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
        except Exception:  # noqa: BLE001 - a diagnostic: without it the phase still runs
            self.connection = None

    def read(self) -> int | None:
        if self.connection is None:
            return None
        try:
            row = self.connection.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        except Exception:  # noqa: BLE001 - older PostgreSQL has no sessions column
            return None
        return int(row[0]) if row and row[0] is not None else None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def _run_phase(spec: dict[str, Any], server_pid: int, timeout_s: float, database_url: str) -> dict[str, Any]:
    import multiprocessing

    sessions = _SessionCounter(database_url)
    sessions_at_start: int | None = None
    per_worker: list[int] = []
    sessions_opened: int | None = None
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_load_main, args=(theirs, spec), name=f"uisps-bench-load-{spec['phase']}")
    child.start()
    theirs.close()
    meter = CpuMeter(server_pid, child.pid or -1)
    cpu: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not ours.poll(remaining):
                raise BenchError(f"the load process did not finish phase {spec['phase']!r} in {timeout_s:.0f} s")
            try:
                event, payload = ours.recv()
            except EOFError:
                raise BenchError(f"the load process died during phase {spec['phase']!r}") from None
            if event == "start":
                meter.start()
                sessions_at_start = sessions.read()
                per_worker = _connections_per_worker(server_pid, spec["port"])
            elif event == "end":
                cpu = meter.stop()
                sessions_at_end = sessions.read()
                if sessions_at_start is not None and sessions_at_end is not None:
                    sessions_opened = sessions_at_end - sessions_at_start
            elif event == "failed":
                raise BenchError(f"the load process failed in phase {spec['phase']!r}: {payload}")
            elif event == "result":
                if cpu and payload["requests"]:
                    count = payload["requests"]
                    per_request = {group: 1000 * seconds / count for group, seconds in cpu["cpu_s"].items()}
                    cpu["ms_per_request"] = {group: round(ms, 3) for group, ms in per_request.items()}
                    # What the machine's cores could serve if this phase's CPU per request (API,
                    # database, broker and the client together) were the only limit.
                    total = sum(per_request.values())
                    cpu["cpu_bound_ceiling_rps"] = round(cpu_count() * 1000 / total) if total > 0 else None
                payload["cpu"] = cpu
                payload["database_sessions_opened"] = sessions_opened
                payload["connections_per_worker"] = per_worker
                return payload
    finally:
        sessions.close()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        ours.close()


def _host_description() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        pass
    return {
        "cpu_model": model,
        "cpu_count": cpu_count(),
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def run_api_bench(setup: ApiBenchSetup, log: Callable[[str], None] = lambda _line: None) -> dict[str, Any]:
    """Set up, load, tear down; the result (see `markdown`)."""
    if setup.concurrency < 1 or setup.duration_s <= 0 or setup.keys < 1 or setup.seed_requests < 1 or setup.rate < 0:
        raise BenchError("duration, concurrency, keys and seed requests must be positive, the rate at least 0")
    from core.db.migrate import upgrade

    host = _host_description()
    workers = setup.effective_workers
    home = Path(tempfile.mkdtemp(prefix="uisps-bench-api-"))
    database: _Database | None = None
    broker_url: str | None = None
    server: _Server | None = None
    started = time.time()
    try:
        if setup.database_url:
            url = setup.database_url
        else:
            database = _Database(setup.admin_url)
            database.create()
            url = database.url
            log(f"created database {database.name}")
        upgrade(url)  # here, once: the API workers' own start-up upgrade then finds nothing to do
        db_description = _database_description(url)
        broker_url = setup.broker_url or _pick_redis_db(DEFAULT_REDIS_URL)
        admin_key, keys = _create_keys(url, setup.keys)
        env = {k: v for k, v in os.environ.items() if not k.startswith("UISPS_")}
        env |= {
            "UISPS_HOME": str(home),
            "UISPS_DATABASE_URL": url,
            "UISPS_BROKER_URL": broker_url,
            "UISPS_RATE_LIMIT_PER_S": UNREACHABLE_RATE,
            "UISPS_RATE_LIMIT_BURST": UNREACHABLE_RATE,
            "UISPS_TENANT_RATE_LIMIT_PER_S": UNREACHABLE_RATE,
            "UISPS_TENANT_RATE_LIMIT_BURST": UNREACHABLE_RATE,
            "UISPS_MAX_ACTIVE_REQUESTS_PER_TENANT": UNREACHABLE_RATE,
            "OMP_NUM_THREADS": "1",
        }
        env["UISPS_ACCESS_LOG"] = "true" if setup.access_log else "false"
        server = _Server(home, env, workers)
        server.start()
        log(f"API on {server.url} ({workers} uvicorn workers), broker {broker_url}")
        server.wait_ready()
        keepalive_ms = _keepalive_probe(server.url)
        if keepalive_ms >= NAGLE_SUSPECT_MS:
            log(f"warning: GET /healthz takes {keepalive_ms:.0f} ms on a kept-alive connection: "
                "Nagle's algorithm is on (uvicorn --workers without uvloop)")
        model_id, ids, labels = _seed(server.url, admin_key, keys[0], setup.seed_requests)
        log(f"seeded model {model_id} and {len(ids)} queued deletion requests")
        background = _background_busy_percent()
        if background is not None and background >= 100 * OTHER_LOAD_WARNING_CORES / host["cpu_count"]:
            log(f"warning: the machine is already {background:.0f} % busy before the load starts")
        assert server.process is not None
        common = {
            "host": "127.0.0.1", "port": server.port, "keys": keys, "concurrency": setup.concurrency,
            "warmup_s": setup.warmup_s, "seed": setup.seed,
        }
        phases = []
        plan: list[tuple[str, float, dict[str, Any]]] = [("get", setup.duration_s, {"ids": ids, "expect_status": 200})]
        if setup.rate > 0:
            plan.append(("get_at_rate", setup.duration_s, {"ids": ids, "expect_status": 200, "rate": setup.rate}))
        plan.append(("create", setup.effective_create_duration_s,
                     {"model_id": model_id, "labels": labels, "expect_status": 202}))
        for phase, duration, extra in plan:
            pace = f" at {extra['rate']:g} req/s" if extra.get("rate") else ""
            log(f"phase {phase}: {setup.concurrency} connections{pace} for {duration:g} s "
                f"(after {setup.warmup_s:g} s warm-up)")
            spec = common | extra | {"phase": phase, "duration_s": duration}
            result = _run_phase(spec, server.process.pid, setup.warmup_s + duration + 120, url)
            phases.append(_phase_record(phase, duration, setup, result))
            if server.process.poll() is not None:
                raise BenchError(f"the API exited during phase {phase!r}:\n{server.log_tail()}")
        server_log_tail = server.log_tail(20)
    finally:
        cleanup_errors = []
        for step in (
            (lambda: server.stop()) if server else None,
            (lambda: _flush_redis(broker_url)) if broker_url else None,
            (lambda: database.drop()) if database else None,
        ):
            if step is None:
                continue
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one failed step must not skip the others
                cleanup_errors.append(f"{type(exc).__name__}: {exc}")
        shutil.rmtree(home, ignore_errors=True)
        for error in cleanup_errors:
            log(f"cleanup: {error}")
    return {
        "benchmark": "api",
        "device": f"{host['cpu_model']} ({host['cpu_count']} cores), loopback, no accelerator",
        "host": host,
        "cpu_count": host["cpu_count"],
        "database": db_description,
        "database_kept": database is None,
        "background_busy_percent": background,
        "keepalive_healthz_p50_ms": keepalive_ms,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "server": {
            "command": _Server.shown_command(workers),
            "workers": workers,
            **(server.uvicorn_implementations() if server else {}),
            "access_log": setup.access_log,  # the service's (UISPS_ACCESS_LOG), to a file
            "celery_worker": False,
            "settings": {
                "UISPS_RATE_LIMIT_PER_S": UNREACHABLE_RATE, "UISPS_RATE_LIMIT_BURST": UNREACHABLE_RATE,
                "UISPS_TENANT_RATE_LIMIT_PER_S": UNREACHABLE_RATE, "UISPS_TENANT_RATE_LIMIT_BURST": UNREACHABLE_RATE,
                "UISPS_MAX_ACTIVE_REQUESTS_PER_TENANT": UNREACHABLE_RATE,
            },
            "log_tail": server_log_tail,
        },
        "client": {
            "kind": "asyncio HTTP/1.1 keep-alive client (uisps/bench_api.py), in a spawned process",
            "concurrency": setup.concurrency,
            "api_keys": setup.keys,
            "warmup_s": setup.warmup_s,
        },
        "setup": {"seeded_requests": setup.seed_requests, "tenant": TENANT},
        "phases": phases,
        "goal": _goal(phases),
    }


def _goal(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """At least GOAL_GET_RPS polls per second answered with p99 <= GOAL_GET_P99_MS, no errors.

    Judged on the open-loop phase when it ran at the goal's rate (the latency of 1000 polls a
    second), else on the closed-loop one (the latency at the most it can answer, which is higher)."""
    by_name = {p["name"]: p for p in phases}
    at_rate = by_name.get("get_at_rate")
    judged = at_rate if at_rate and at_rate["target_rps"] >= GOAL_GET_RPS else by_name["get"]
    # open loop: answering 99 % of the scheduled rate is keeping up (the last sends of the
    # window are still in flight when it closes)
    needed = 0.99 * GOAL_GET_RPS if judged is at_rate else GOAL_GET_RPS
    return {
        "phase": judged["name"],
        "requests_per_second_min": GOAL_GET_RPS,
        "p99_ms_max": GOAL_GET_P99_MS,
        "met": bool(
            judged["errors"] == 0
            and judged["requests_per_second"] >= needed
            and judged["p99_ms"] <= GOAL_GET_P99_MS
        ),
    }


def _phase_record(phase: str, duration: float, setup: ApiBenchSetup, result: dict[str, Any]) -> dict[str, Any]:
    what = {
        "get": ("GET", "/deletion-requests/{id}", f"random ids among {setup.seed_requests} queued requests"),
        "get_at_rate": ("GET", "/deletion-requests/{id}",
                        f"as `get`, open loop at {setup.rate:g} req/s, latency from each request's scheduled time"),
        "create": ("POST", "/deletion-requests", "one label, a fresh Idempotency-Key each"),
    }[phase]
    return {
        "name": phase,
        "method": what[0],
        "path": what[1],
        "what": what[2],
        "concurrency": setup.concurrency,
        "duration_s": duration,
        "target_rps": setup.rate if phase == "get_at_rate" else None,  # None: closed loop
        **result,
    }


def markdown(result: dict[str, Any]) -> str:
    host, server, goal = result["host"], result["server"], result["goal"]
    lines = [
        f"# API load: {result['database']}, {host['cpu_count']} cores",
        "",
        f"{result['device']}; {host['os']}, Python {host['python']}; {result['started_at']}"
        + (f"; machine {result['background_busy_percent']:.0f} % busy just before the load."
           if result.get("background_busy_percent") is not None else "."),
        f"Server: `{server['command']}` ({server.get('loop', '?')} loop, {server.get('http', '?')} HTTP parser),",
        "no Celery worker (requests stay queued); rate limit on but out of reach; the service's access log "
        f"{'on (to a file)' if server.get('access_log') else 'off'}; "
        f"GET /healthz on a kept-alive connection: {result.get('keepalive_healthz_p50_ms', float('nan')):.1f} ms.",
        f"Client: {result['client']['kind']}, {result['client']['concurrency']} connections, "
        f"{result['client']['api_keys']} API key(s), {result['client']['warmup_s']:g} s warm-up per phase.",
        "",
        "| phase | request | load | s | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["phases"]:
        load = f"open loop, {p['target_rps']:g}/s" if p.get("target_rps") else "closed loop"
        lines.append(
            f"| {p['name']} | `{p['method']} {p['path']}` | {load} | {p['duration_s']:g} | {p['requests_per_second']:.0f} | "
            f"{p['p50_ms']:.1f} | {p['p90_ms']:.1f} | {p['p99_ms']:.1f} | {p['max_ms']:.1f} | {p['errors']} |"
        )
    lines += ["", "CPU during each phase, in cores used (CPU ms per request); the load client runs on the same "
              "machine and competes with the server:", ""]
    lines += ["| phase | API workers | PostgreSQL | Redis | load client | other processes | machine busy |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    busiest_other, busiest_names = 0.0, {}
    for p in result["phases"]:
        cpu = p.get("cpu", {})
        cores, per = cpu.get("cores_used", {}), cpu.get("ms_per_request", {})
        cell = lambda g: f"{cores[g]:.2f} ({per[g]:.2f} ms)" if g in cores and g in per else "?"  # noqa: E731
        busy = cpu.get("host_busy_percent")
        if cores.get("other", 0.0) > busiest_other:
            busiest_other, busiest_names = cores["other"], cpu.get("other_processes", {})
        lines.append(
            f"| {p['name']} | {cell('api')} | {cell('postgresql')} | {cell('redis')} | {cell('client')} | "
            f"{cores.get('other', '?')} | {'?' if busy is None else f'{busy:.0f} %'} |"
        )
    spread = [
        f"{p['name']} {'/'.join(str(n) for n in p['connections_per_worker'])}"
        for p in result["phases"] if p.get("connections_per_worker")
    ]
    if spread:
        lines += ["", f"Client connections per uvicorn worker: {', '.join(spread)} (opened "
                  f"{CONNECT_STAGGER_S * 1000:.0f} ms apart; a burst would all go to one worker)."]
    churn = [p for p in result["phases"] if p.get("database_sessions_opened") is not None]
    if churn:
        counts = ", ".join(
            f"{p['name']} {p['database_sessions_opened']} ({p['database_sessions_opened'] / p['duration_s']:.0f}/s)"
            for p in churn
        )
        lines += ["", f"New PostgreSQL connections during the phases: {counts}."]
        if any(p["database_sessions_opened"] / p["duration_s"] > CHURN_PER_S for p in churn):
            lines[-1] += (" More than a few per second is connection churn: the API's pool closes what it opened "
                          "beyond its pool_size, and each new connection costs a backend start and a login "
                          "(counted under PostgreSQL).")
    ceilings = [
        f"{p['name']} {p['cpu']['cpu_bound_ceiling_rps']} req/s"
        for p in result["phases"] if p.get("cpu", {}).get("cpu_bound_ceiling_rps")
    ]
    if ceilings:
        lines += ["", f"CPU-bound ceiling on {host['cpu_count']} cores (cores x 1000 / CPU ms per request of API, "
                  f"PostgreSQL, Redis and client): {', '.join(ceilings)}."]
    if busiest_other >= OTHER_LOAD_WARNING_CORES:
        names = ", ".join(f"{name} {cores:.2f}" for name, cores in busiest_names.items())
        lines += ["", f"**Warning:** other processes used up to {busiest_other:.2f} cores during the run"
                  f"{f' ({names})' if names else ''}; these figures understate what the service does on a quiet "
                  "machine."]
    if result.get("keepalive_healthz_p50_ms", 0.0) >= NAGLE_SUSPECT_MS:
        lines += ["", f"**Warning:** GET /healthz took {result['keepalive_healthz_p50_ms']:.0f} ms on a kept-alive "
                  "connection: Nagle's algorithm holds each response body for the client's delayed ACK "
                  "(`uvicorn --workers` on asyncio rather than uvloop, see uisps/serving.py); latencies include "
                  "~40 ms of it."]
    verdict = "met" if goal["met"] else "NOT met"
    judged = next(p for p in result["phases"] if p["name"] == goal["phase"])
    lines += [
        "",
        f"Goal ({goal['requests_per_second_min']:.0f} GET/s with p99 <= {goal['p99_ms_max']:.0f} ms), judged on phase "
        f"`{judged['name']}`: **{verdict}** ({judged['requests_per_second']:.0f} GET/s, p99 {judged['p99_ms']:.1f} ms, "
        f"{judged['errors']} errors).",
    ]
    for p in result["phases"]:
        if p["error_samples"]:
            lines += ["", f"First errors of phase {p['name']}:", ""] + [f"- `{e}`" for e in p["error_samples"]]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{RESULT_NAME}.json", out / f"{RESULT_NAME}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


__all__ = ["ApiBenchSetup", "BenchError", "markdown", "run_api_bench", "write_results"]
