"""How `uisps serve` runs uvicorn, the one way the API is served (docker-compose, the Dockerfile,
`uisps bench api` and the tests all go through it).

The event loop and the HTTP parser are uvloop and httptools (`uvicorn[standard]`), not asyncio and
h11, for two reasons measured with `uisps bench api`:

- they spend less CPU per request in the server itself;
- uvloop sets TCP_NODELAY on every TCP connection. asyncio does so only for sockets created with
  `proto=IPPROTO_TCP`; with `--workers N` uvicorn binds the listening socket itself with `proto`
  0, its workers' accepted connections inherit that, and Nagle's algorithm then holds back each
  keep-alive response's body until the client's delayed ACK of its headers: about 40 ms a request
  on Linux.

Where uvloop or httptools is not installed (uvicorn[standard] leaves uvloop out on Windows and
PyPy) uvicorn's pure-Python choices are used, and `implementations` says which.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

APP = "api.app:create_app"
# After SIGTERM, requests in flight (a 512 MiB upload, a streamed download) get this long to
# finish; compose's stop_grace_period for the API (60 s) leaves room for it.
GRACEFUL_SHUTDOWN_S = 50


def implementations() -> dict[str, str]:
    """{"loop": ..., "http": ...}: what `uisps serve` asks uvicorn for in this environment."""
    has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return {"loop": "uvloop" if has("uvloop") else "asyncio", "http": "httptools" if has("httptools") else "h11"}


def run_api(host: str, port: int, *, workers: int = 1, log_level: str = "info") -> None:
    """Serve the API until stopped (SIGINT/SIGTERM), `workers` processes sharing one socket.

    uvicorn's own access log stays off: the service writes one line per request itself
    (`uisps.access`, with the request id; UISPS_ACCESS_LOG), and two lines per request would
    double the logging cost of the hottest path.
    """
    import uvicorn

    chosen = implementations()
    if workers > 1 and chosen["loop"] != "uvloop":
        logger.warning(
            "uvloop is not installed: with --workers %d, keep-alive responses may wait ~40 ms each for "
            "Nagle's algorithm (install uvicorn[standard])", workers,
        )
    options: dict[str, Any] = {"factory": True, "host": host, "port": port, "workers": workers,
                               "log_level": log_level, "access_log": False,
                               "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S, **chosen}
    with shared_metrics(workers):
        uvicorn.run(APP, **options)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # api.metrics reads it; the CLI must not import the app


@contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several API processes, one folder where all of them keep their HTTP metrics, so that
    a scrape (which reaches any one of them) reports the sum. Without it each scrape showed one
    process's counters, and Prometheus read every change of process as a counter reset. A folder
    of this run's own, emptied as prometheus_client requires, unless the operator named one."""
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="uisps-metrics-")
    os.environ[MULTIPROC_ENV] = folder  # inherited by the worker processes uvicorn spawns
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
