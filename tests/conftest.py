"""Shared fixtures: real databases and Redis, created per test run and removed afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from run_databases import RunDatabases, create_database, drop_database
from s3_server import aws_env, bucket, s3_endpoint  # noqa: F401  (fixtures, for every test folder)
from service_checks import unavailable
from sqlalchemy.engine import make_url

PG_ADMIN_DSN = os.environ.get(
    "UISPS_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE_URL = os.environ.get("UISPS_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# The service's settings in the caller's shell (UISPS_ARTIFACT_BACKEND=s3, UISPS_DATABASE_URL=...)
# must not change what the tests test, nor point them at a real deployment: each test names its own.
# Kept: the knobs of the tests themselves (docs/service.md names them).
_TEST_KNOBS = {"UISPS_CIFAR10_SUBSET", "UISPS_SCHEMATHESIS_EXAMPLES", "UISPS_SCREENSHOT_DIR"}
for _name in [n for n in os.environ if n.startswith("UISPS_") and not n.startswith("UISPS_TEST_")
              and n not in _TEST_KNOBS]:
    del os.environ[_name]


def _pg_admin() -> psycopg.Connection:
    return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def run_databases() -> Iterator[RunDatabases]:
    """This run's claim on its PostgreSQL databases, held until the run ends; a killed run's
    databases are dropped first."""
    try:
        admin = _pg_admin()
    except psycopg.OperationalError as error:
        unavailable(f"PostgreSQL unreachable at {PG_ADMIN_DSN}: {error} (UISPS_TEST_PG_ADMIN_DSN)")
    with admin:
        run = RunDatabases(admin)
        run.drop_abandoned()
        yield run


@pytest.fixture(scope="session")
def pg_url(run_databases: RunDatabases) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped after the run."""
    with _pg_admin() as admin:
        name = create_database(admin, run_databases.name("test"))
    try:
        yield make_url(PG_ADMIN_DSN).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False)
    finally:
        with _pg_admin() as admin:
            drop_database(admin, name)


# Marks a Redis database as a test run's: only an empty one, or one an earlier (killed) run marked,
# is ever emptied, so a developer's own data in another database number survives the tests.
_TEST_RUN_MARK = "uisps-test-run"


def _idle_redis_db(client: redis.Redis) -> int:
    """A database number (1-15) no client is connected to and that holds nothing but a test run's
    keys, starting from one picked by pid.

    A worker left running by a killed test run (or a run beside this one) still consumes from its
    database, and would take this run's messages if the two shared a number.
    """
    try:
        busy = {int(entry["db"]) for entry in client.client_list()}
    except redis.ResponseError:  # CLIENT LIST refused (a managed Redis's ACL): trust the pid
        busy = set()
    numbers = [1 + (os.getpid() + step) % 15 for step in range(15)]
    # pytest-xdist's workers of one run split the numbers between them, so two never pick one
    # number at the same moment (a run's database counts as busy only once its client connects).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        index = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
        numbers = [n for n in numbers if (n - 1) % workers == index]
    for number in (n for n in numbers if n not in busy):
        probe = redis.Redis.from_url(f"{REDIS_BASE_URL}/{number}", socket_connect_timeout=3)
        try:
            if probe.dbsize() == 0 or probe.exists(_TEST_RUN_MARK):
                return number
        finally:
            probe.close()
    if not numbers:
        pytest.fail(f"{workers} pytest-xdist workers: each needs one of Redis's database numbers 1-15; use -n 15 or fewer")
    pytest.fail(f"no Redis database 1-15 at {REDIS_BASE_URL} is both free of clients and empty (or a test run's); "
                "stop stray `python -m worker` processes")


def _empty(client: redis.Redis) -> None:
    """Empties this run's database, which stays marked as this run's."""
    client.flushdb()
    client.set(_TEST_RUN_MARK, os.getpid())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database number for this run that no one else uses, emptied before and after."""
    probe = redis.Redis.from_url(REDIS_BASE_URL, socket_connect_timeout=3)
    try:
        number = _idle_redis_db(probe)
    except redis.ConnectionError as error:
        unavailable(f"Redis unreachable at {REDIS_BASE_URL} ({error}); see UISPS_TEST_REDIS_URL")
    finally:
        probe.close()
    url = f"{REDIS_BASE_URL}/{number}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    _empty(client)
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def flush_broker(redis_url: str) -> Iterator[Callable[[], None]]:
    """Empties this run's Redis database, as a broker that lost every message; it stays marked as
    this run's, so a run killed after it leaves a database the next run may take."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    yield lambda: _empty(client)
    client.close()


@pytest.fixture
def own_pg_database(pg_url: str, run_databases: RunDatabases) -> Iterator[str]:
    """A PostgreSQL database for one test, on pg_url's server, dropped afterwards.

    Not pg_url itself when a worker process runs: its reconciler re-sends every queued request it
    finds, and the shared database holds requests other tests queued on purpose without a worker.
    """
    with _pg_admin() as admin:
        name = create_database(admin, run_databases.name("own"))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with _pg_admin() as admin:
            drop_database(admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite database file in this test's temporary folder (not yet created)."""
    return f"sqlite:///{tmp_path / 'uisps.db'}"


# --- core engine fixtures -------------------------------------------------------------------


class TrainedDigits:
    """A smallcnn trained on scikit-learn's digits, with its manifest and data (fp32, CPU)."""

    def __init__(self) -> None:
        import torch

        from core.config import TrainConfig
        from core.data import load_dataset
        from core.workflow import train_model

        self.dataset = load_dataset("digits")
        self.device = torch.device("cpu")
        self.model, self.manifest = train_model(
            self.dataset, "smallcnn", TrainConfig(epochs=15, lr=0.1, precision="fp32"), self.device
        )
        self.model.eval()


@pytest.fixture(scope="session")
def trained_digits() -> TrainedDigits:
    return TrainedDigits()


@pytest.fixture
def digits_copy(trained_digits: TrainedDigits):
    """A fresh copy of the trained model, free to modify."""
    import copy

    return copy.deepcopy(trained_digits.model)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """safetensors bytes of a smallcnn trained on digits, trained once per test run (shared through
    the run's temp root), on one torch thread: two oversubscribe a small shared CI machine."""
    cached = tmp_path_factory.getbasetemp() / "digits-smallcnn.safetensors"
    if not cached.exists():
        import torch

        from uisps.demo import train_digits_checkpoint

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cached.write_bytes(train_digits_checkpoint())
        finally:
            torch.set_num_threads(before)
    return cached.read_bytes()


@pytest.fixture
def unique_digits_checkpoint(digits_checkpoint: bytes) -> bytes:
    """The digits checkpoint with one weight moved at random: bytes no other test stored. Stored
    files are content-addressed and the PostgreSQL database is shared by the whole run, so a test
    that needs the only version naming its file (a purge, a collection) must use its own bytes."""
    import torch

    from core.checkpoint import checkpoint_bytes, load_checkpoint_bytes

    model, manifest = load_checkpoint_bytes(digits_checkpoint)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += float(torch.rand(()).item()) + 1.0
    return checkpoint_bytes(model, manifest)
