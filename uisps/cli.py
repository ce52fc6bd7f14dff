"""`uisps`: the command line. Errors a user can fix print one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Zero-glance class unlearning (UISPS).")


def parse_labels(text: str) -> list[int]:
    from core.errors import InvalidLabels

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidLabels(f"labels must be comma-separated integers, got {text!r}") from None


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors caused by input into one line on stderr and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from core.errors import UisError

        try:
            return fn(*args, **kwargs)
        except UisError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def unlearn_config(params: str):  # noqa: ANN201
    """UnlearnConfig from the JSON of --params; a bad one is a UisError naming the field."""
    from pydantic import ValidationError

    from core.config import UnlearnConfig

    try:
        return UnlearnConfig.model_validate_json(params)
    except ValidationError as exc:
        raise _invalid(exc, lambda where: f"--params: {where}") from None


def _invalid(exc: Any, name: Callable[[str], str]) -> Exception:
    """The first problem of a pydantic ValidationError, as a UisError; `name` says where it was given."""
    from core.errors import UisError

    err = exc.errors()[0]
    return UisError(f"{name('.'.join(str(p) for p in err['loc']) or 'body')}: {err['msg']}")


def output_file(path: Path, option: str) -> Path:
    """Refuse, before any work is done, an output path that can never become a file: a folder, a
    file standing where one of its folders should be, or a folder nothing can be made in."""
    from core.errors import UisError

    if path.is_dir():
        raise UisError(f"{option}: {path} is a folder; name the file to write")
    if path.exists() and not _can_append_to(path):  # a report is written in place
        raise UisError(f"{option}: cannot write {path}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UisError(f"{option}: {parent} is a file, so {path} cannot be written")
            if not _can_create_in(parent):
                raise UisError(f"{option}: cannot write in {parent}")
            break
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, by making one and removing it: `os.access` says yes
    to root everywhere, also where writes fail (/proc, a read-only mount, NFS with root squashed)."""
    import os
    import tempfile

    try:
        handle, name = tempfile.mkstemp(prefix=".uisps-write-check-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    try:
        os.unlink(name)
    except OSError:  # made but not removable (an append-only folder): the file itself can be written
        pass
    return True


def _can_append_to(path: Path) -> bool:
    """Whether an existing file can be written, by opening it to append and writing nothing."""
    try:
        with path.open("ab"):
            return True
    except OSError:
        return False


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A `ProgressFn` that draws one bar per stage on stderr."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bars:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield report


def _device(name: str):  # noqa: ANN202
    from core.device import pick_device

    return pick_device(name)


DatasetOpt = Annotated[str, typer.Option("--dataset", help="digits | npz:<path> | cifar10:<root> | ...")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:1")]


@app.command()
@user_errors
def train(
    dataset: DatasetOpt,
    out: Annotated[Path, typer.Option("--out", help="checkpoint to write (.safetensors)")],
    arch: Annotated[str, typer.Option("--arch")] = "smallcnn",
    epochs: Annotated[int, typer.Option("--epochs")] = 30,
    lr: Annotated[float, typer.Option("--lr")] = 0.05,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    exclude: Annotated[str, typer.Option("--exclude", help="labels to leave out (the Retrain reference)")] = "",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16")] = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Train a classifier and save it as a safetensors checkpoint."""
    from pydantic import ValidationError

    from core.checkpoint import save_checkpoint
    from core.config import TrainConfig
    from core.data import load_dataset
    from core.workflow import evaluate_model, train_model

    try:
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, precision=precision)
    except ValidationError as exc:
        raise _invalid(exc, lambda field: "--" + field.replace("_", "-")) from None
    output_file(out, "--out")
    data = load_dataset(dataset)
    dev = _device(device)
    with progress_bars() as report:
        model, manifest = train_model(data, arch, cfg, dev, parse_labels(exclude), report)
    sha = save_checkpoint(out, model, manifest)
    ev = evaluate_model(model, manifest, data, [], dev)
    typer.echo(json.dumps({"checkpoint": str(out), "sha256": sha, "acc_test": ev.acc_retain}))


@app.command()
@user_errors
def unlearn(
    checkpoint: Annotated[Path, typer.Option("--checkpoint")],
    dataset: DatasetOpt,
    forget: Annotated[str, typer.Option("--forget", help="labels to forget, e.g. 3 or 0,1,2")],
    out: Annotated[Path, typer.Option("--out")],
    report: Annotated[Path | None, typer.Option("--report", help="write the JSON report here")] = None,
    params: Annotated[str, typer.Option("--params", help="JSON overrides of UnlearnConfig")] = "{}",
    device: DeviceOpt = "auto",
) -> None:
    """Forget whole classes without reading their data (UISPS); writes a new checkpoint."""
    from core.checkpoint import load_checkpoint, save_checkpoint, sha256_file
    from core.data import load_dataset
    from core.workflow import unlearn_model

    labels = parse_labels(forget)
    cfg = unlearn_config(params)
    output_file(out, "--out")
    if report:
        output_file(report, "--report")
    model, manifest = load_checkpoint(checkpoint)
    data = load_dataset(dataset)
    with progress_bars() as bars:
        result = unlearn_model(model, manifest, data, labels, cfg, _device(device), bars)
    result.manifest.parent_sha256 = sha256_file(checkpoint)
    sha = save_checkpoint(out, result.model, result.manifest)
    result.report["checkpoint_sha256"] = sha
    text = json.dumps(result.report, indent=2)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text + "\n")
    summary = {k: result.report[k] for k in ("forget_labels", "frozen_fraction", "checkpoint_sha256")}
    summary |= {"before": _brief(result.report["before"]), "after": _brief(result.report["after"])}
    typer.echo(json.dumps(summary))


def _brief(ev: dict) -> dict:
    return {k: round(ev[k], 2) if ev[k] is not None else None for k in ("acc_retain", "acc_forget", "mia")}


@app.command()
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint")],
    dataset: DatasetOpt,
    forget: Annotated[str, typer.Option("--forget")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """A_Dr, A_Df (test split) and MIA (forgotten classes' training samples) of a checkpoint."""
    from core.checkpoint import load_checkpoint
    from core.data import load_dataset
    from core.workflow import evaluate_model

    model, manifest = load_checkpoint(checkpoint)
    ev = evaluate_model(model, manifest, load_dataset(dataset), parse_labels(forget), _device(device))
    if as_json:
        typer.echo(json.dumps(ev.as_dict()))
    else:
        for key, value in _brief(ev.as_dict()).items():
            typer.echo(f"{key:<11} {value}")




# --- The service: `uisps serve`, `uisps worker`, `uisps db ...`, `uisps demo` -------------------

db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations (Alembic).")
app.add_typer(db_app, name="db")

WORKER_STOP_GRACE_S = 30.0


@app.command()
@user_errors
def serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="run the API only")] = False,
    log_level: Annotated[str | None, typer.Option(
        "--log-level", help="of the API, its worker and uvicorn (default: UISPS_LOG_LEVEL, INFO)")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, envvar="UISPS_API_WORKERS",
        help="API processes sharing the port (one per core is the usual choice)")] = 1,
) -> None:
    """Run the HTTP API (uvloop + httptools) and, unless --no-worker, a local worker process (stopped
    with the API)."""
    import os

    from core.db.migrate import upgrade
    from core.errors import UisError
    from core.settings import get_settings
    from uisps.local import stop_process
    from uisps.serving import run_api

    _refuse_unknown_settings("not started: ")  # a misspelt UISPS_DATABASE_URL would serve the embedded database
    if log_level is not None:  # read by the API processes and the worker, which get this environment
        os.environ["UISPS_LOG_LEVEL"] = log_level.upper()
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    # Migrate before the worker starts: its reconciler reads the deletion_requests table. A schema
    # newer than this code (a rollback to an older image) is one line, not Alembic's traceback.
    with _migration_errors(hint=_ROLLBACK_HINT):
        upgrade(settings.effective_database_url)
    worker = None if no_worker else _spawn_worker(settings.log_level)
    watch = None if worker is None else _WorkerWatch(worker)
    try:
        run_api(host, port, workers=workers, log_level=settings.log_level.lower())
    finally:
        if watch is not None:
            watch.stop()
        stop_process(worker, WORKER_STOP_GRACE_S)
    if watch is not None and watch.exited_on_its_own:
        raise UisError(f"stopped: the worker exited (status {worker.returncode}); its log above says why")


def _spawn_worker(log_level: str):  # noqa: ANN202
    import subprocess

    from uisps.lifeline import tied_to_this_process

    # A session of its own: a terminal's Ctrl+C reaches `serve` only, which stops the worker after
    # the API has drained (and the worker's exit is then not taken for a crash).
    command = tied_to_this_process([sys.executable, "-m", "worker", f"--loglevel={log_level.upper()}"])
    return subprocess.Popen(command, start_new_session=True)


class _WorkerWatch:
    """Stops the API (as Ctrl+C does) if the worker exits on its own: an API whose worker refused to
    start (a GPU this machine lacks, say) or died would accept deletion requests that never run."""

    def __init__(self, worker: Any) -> None:
        import threading

        self.worker = worker
        self.exited_on_its_own = False
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _watch(self) -> None:
        import os
        import signal

        while not self._stopping.wait(0.5):
            if self.worker.poll() is not None:
                self.exited_on_its_own = True
                os.kill(os.getpid(), signal.SIGINT)
                return

    def stop(self) -> None:
        """Before the worker is stopped with the API: its exit is then expected."""
        self._stopping.set()


@app.command()
@user_errors
def worker(
    pool: Annotated[str, typer.Option("--pool", help="prefork (default) or solo")] = "prefork",
    concurrency: Annotated[int, typer.Option("--concurrency", help="jobs at once (each may use a whole GPU)")] = 1,
    loglevel: Annotated[str | None, typer.Option("--loglevel", help="default: UISPS_LOG_LEVEL")] = None,
) -> None:
    """Run a Celery worker that executes deletion requests (settings from UISPS_* variables)."""
    from worker.main import start_worker

    start_worker(pool=pool, concurrency=concurrency, loglevel=loglevel)


_ROLLBACK_HINT = (": a newer release may have migrated this database; downgrade it with that release "
                  "(`uisps db downgrade --revision <this release's revision>`) before starting this one")


@contextmanager
def _migration_errors(hint: str = "", asked: str | None = None) -> Iterator[None]:
    """An unknown revision or an unreachable database: one line, not Alembic's traceback. `hint`
    follows a revision the code does not know (a database a newer release migrated)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        yield
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as exc:  # a malformed or unsupported URL
        typer.echo(f"error: UISPS_DATABASE_URL is not a database this service can use: {exc}", err=True)
        raise typer.Exit(2) from None
    except CommandError as exc:
        # The hint is for a revision the database is at; `asked`, the one the user typed, is not.
        database_ahead = "locate revision" in str(exc) and (asked is None or repr(asked) not in str(exc))
        typer.echo(f"error: {exc}{hint if database_ahead else ''}", err=True)
        raise typer.Exit(2) from None
    except OperationalError as exc:
        typer.echo(f"error: cannot reach the database: {str(exc.orig).strip().splitlines()[0]}", err=True)
        raise typer.Exit(1) from None


@db_app.command("upgrade")
@user_errors
def db_upgrade(revision: Annotated[str, typer.Option("--revision")] = "head") -> None:
    """Migrate the database (UISPS_DATABASE_URL, or the embedded SQLite) up to a revision."""
    from core.db.migrate import current_revision, upgrade
    from core.settings import get_settings

    _refuse_unknown_settings()  # a misspelt UISPS_DATABASE_URL would migrate the embedded database
    url = get_settings().effective_database_url
    with _migration_errors(hint=_ROLLBACK_HINT, asked=revision):
        upgrade(url, revision)
        typer.echo(f"database at revision {current_revision(url)}")


@db_app.command("downgrade")
@user_errors
def db_downgrade(
    revision: Annotated[str, typer.Option("--revision", help="target; 'base' removes every table")] = "-1",
) -> None:
    """Migrate the database down (one revision by default)."""
    from core.db.migrate import current_revision, downgrade
    from core.settings import get_settings

    _refuse_unknown_settings()
    url = get_settings().effective_database_url
    with _migration_errors():
        downgrade(url, revision)
        typer.echo(f"database at revision {current_revision(url)}")


@app.command()
def demo(
    home: Annotated[Path | None, typer.Option("--home", help="UISPS_HOME to use (default: a fresh temporary folder)")] = None,
    forget: Annotated[int, typer.Option("--forget", help="the digit to forget")] = 3,
    fast: Annotated[bool, typer.Option("--fast", help="tiny hyperparameters instead of the defaults")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the temporary UISPS_HOME (a failed run keeps it anyway)")] = False,
) -> None:
    """Train, register, forget one digit over HTTP, download, verify and evaluate; then stop."""
    from uisps.demo import run_demo

    try:
        run_demo(home=home, forget=forget, fast=fast, keep=keep, console=Console(), err_console=Console(stderr=True))
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # one line, never a traceback: the server log has the details
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        raise typer.Exit(1) from None


# --- `uisps bench ...`: benchmarks (`bench paper` here; `bench perf` may join this sub-app) -------

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: the paper's tables on real data, and speed.")
app.add_typer(bench_app, name="bench")


@bench_app.command("paper")
@user_errors
def bench_paper(
    data: Annotated[str | None, typer.Option(
        "--data", help="data spec, e.g. npz:cifar10_subset.npz (default: the preset's; full: $UISPS_CIFAR10_SUBSET)")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for paper.json, paper.md, paper-raw.jsonl, plots")] = Path("docs/results"),
    preset: Annotated[str, typer.Option("--preset", help="quick (digits smoke run) | full (the paper's settings)")] = "quick",
    device: DeviceOpt = "auto",
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="seeds per row (default: the preset's)")] = None,
    first_seed: Annotated[int, typer.Option(
        "--first-seed", min=0, help="run seeds FIRST .. FIRST+seeds-1 (with --resume: rows of lower seeds are kept)")] = 0,
    time_budget: Annotated[float | None, typer.Option(
        "--time-budget", help="seconds; no new row starts after this (finished rows are kept)")] = None,
    experiments: Annotated[str, typer.Option(
        "--experiments", help="comma-separated subset of main,tune,ablation,alpha,lambda,retain_fraction")] = "",
    order: Annotated[str, typer.Option(
        "--order", help="seed: every experiment (in priority order) per seed; experiment: all seeds of one first")] = "seed",
    preset_json: Annotated[str, typer.Option("--preset-json", help="JSON overrides of the preset's fields")] = "{}",
    resume: Annotated[bool, typer.Option(
        "--resume",
        help="keep the finished rows of an earlier run with the same settings and code in --out; run the rest")] = False,
    model_cache: Annotated[Path | None, typer.Option(
        "--model-cache", help="folder of trained Originals/Retrains reused across runs "
        "(default: $XDG_CACHE_HOME/uisps/bench-models)")] = None,
    no_model_cache: Annotated[bool, typer.Option(
        "--no-model-cache", help="train every Original and Retrain this run needs")] = False,
) -> None:
    """Re-run the paper's tables (UISPS against the baselines); rows are written as they finish."""
    import os

    from core.bench_cache import TrainedModels, default_root
    from core.bench_paper import EXPERIMENTS, PaperBench, make_preset
    from core.data import load_dataset
    from core.errors import UisError

    def log(line: str) -> None:
        typer.echo(line, err=True)

    try:
        overrides = json.loads(preset_json)
        chosen = make_preset(preset, overrides)
        wanted = [e.strip() for e in experiments.split(",") if e.strip()] or list(EXPERIMENTS)
        spec = data or chosen.data or os.environ.get("UISPS_CIFAR10_SUBSET")
        if spec and preset == "full" and not data and ":" not in spec:
            spec = f"npz:{spec}"
        if not spec:
            raise UisError("the full preset needs --data npz:<cifar10_subset.npz> (or $UISPS_CIFAR10_SUBSET)")
        if no_model_cache and model_cache is not None:
            raise UisError("bench paper: --model-cache and --no-model-cache exclude each other")
        models = None if no_model_cache else TrainedModels(model_cache or default_root(), log)
        bench = PaperBench(chosen, load_dataset(spec), _device(device), out, wanted, seeds, time_budget, order,
                           log=log, resume=resume, models=models, first_seed=first_seed)
    except (ValueError, TypeError) as exc:
        raise UisError(f"bench paper: {exc}") from None
    rows = bench.run()
    meta = bench.meta
    typer.echo(json.dumps({
        "rows": len(rows), "finished_runs": meta["finished_rows"], "planned_runs": meta["planned_rows"],
        "stopped_by_budget": meta["stopped_by_budget"], "not_started": meta["not_started"],
        "elapsed_s": round(meta["elapsed_s"], 1), "device": meta["device"],
        "out": [str(out / name) for name in ("paper.json", "paper.md", "paper-raw.jsonl", *meta["plots"])],
    }))


@bench_app.command("perf")
@user_errors
def bench_perf(
    out: Annotated[Path, typer.Option("--out", help="folder for perf-<device>.json and .md")] = Path("docs/results"),
    data: Annotated[str, typer.Option("--data", help="synthetic (CIFAR-10 sizes) or a data spec")] = "synthetic",
    arch: Annotated[str, typer.Option("--arch")] = "resnet18",
    retrain_epochs: Annotated[int, typer.Option("--retrain-epochs", help="Retrain epochs timed, scaled to 50")] = 2,
    params: Annotated[str, typer.Option("--params", help="JSON overrides of UnlearnConfig")] = "{}",
    precision: Annotated[str, typer.Option("--precision")] = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Time each UISPS stage and a Retrain with the same training loop, in one run."""
    from core.bench_perf import PerfSetup, markdown, run_perf

    dev = _device(device)
    setup = PerfSetup(arch=arch, data=data, retrain_epochs_timed=retrain_epochs, precision=precision)
    result = run_perf(setup, unlearn_config(params), dev)
    out.mkdir(parents=True, exist_ok=True)
    name = f"perf-{dev.type}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    typer.echo(markdown(result))


@bench_app.command("api")
@user_errors
def bench_api(
    duration: Annotated[float, typer.Option("--duration", help="seconds of GET polling (phase 1)")] = 20.0,
    concurrency: Annotated[int, typer.Option("--concurrency", help="concurrent keep-alive connections")] = 32,
    create_duration: Annotated[float | None, typer.Option(
        "--create-duration", help="seconds of POST creations (phase 2); default a quarter of --duration")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="uvicorn workers (default: cores, at least 2)")] = None,
    keys: Annotated[int, typer.Option("--keys", help="API keys the connections share")] = 1,
    rate: Annotated[float, typer.Option(
        "--rate", help="GET/s of the open-loop phase get_at_rate (0: skip it)")] = 1000.0,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="use (and keep) this database instead of a fresh one")] = None,
    admin_url: Annotated[str, typer.Option(
        "--admin-url", help="PostgreSQL server on which the fresh database is created and dropped")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    broker_url: Annotated[str | None, typer.Option(
        "--broker-url", help="Redis URL with a database number of its own: emptied at the end "
        "(default: an empty one of redis://127.0.0.1:6379)")] = None,
    access_log: Annotated[bool, typer.Option(
        "--access-log/--no-access-log", help="the service's access log (UISPS_ACCESS_LOG; on, as by default)")] = True,
    out: Annotated[Path, typer.Option("--out", help="folder for api-bench-cpu.json and .md")] = Path("docs/results"),
) -> None:
    """Load the HTTP API on PostgreSQL over loopback: GET polls (closed loop, then at a fixed rate), then
    POST creations (no worker)."""
    from uisps.bench_api import ApiBenchSetup, BenchError, markdown, run_api_bench, write_results

    setup = ApiBenchSetup(
        duration_s=duration, concurrency=concurrency, create_duration_s=create_duration, workers=workers, keys=keys,
        rate=rate, database_url=database_url, admin_url=admin_url, broker_url=broker_url, access_log=access_log,
    )
    try:
        result = run_api_bench(setup, log=lambda line: typer.echo(line, err=True))
    except BenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    json_path, md_path = write_results(result, out)
    typer.echo(markdown(result))
    typer.echo(f"wrote {json_path} and {md_path}", err=True)


# --- `uisps keys ...`, `uisps audit verify`, `uisps certificate verify|rotate-key`: trust (issue #5)

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(audit_app, name="audit")
certificate_app = typer.Typer(no_args_is_help=True, help="Signed deletion certificates.")
app.add_typer(certificate_app, name="certificate")


@contextmanager
def _session_on(url: Any) -> Iterator[Any]:
    from core.db import make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _refuse_unknown_settings(prefix: str = "") -> None:
    """UisError naming each UISPS_* variable no setting has (with the likely intended name)."""
    from core.errors import UisError
    from core.settings import unknown_environment_names

    unknown = unknown_environment_names()
    if unknown:
        raise UisError(f"{prefix}unknown setting {', '.join(unknown)}")


@contextmanager
def _service_database() -> Iterator[Any]:
    """A session on the service's database (UISPS_DATABASE_URL or the embedded SQLite), migrated.
    Refused where a UISPS_* name is unknown: a misspelt UISPS_DATABASE_URL would write a new key
    into the embedded database, and the service would then answer it 401."""
    from core.db.migrate import upgrade
    from core.settings import get_settings

    _refuse_unknown_settings()
    url = get_settings().effective_database_url
    with _migration_errors():
        upgrade(url)
        with _session_on(url) as session:
            yield session


@contextmanager
def _existing_service_database() -> Iterator[Any]:
    """A session on the service's database as it is, never created or migrated here: a command
    that deletes what the database does not name must stop when pointed at the wrong database
    (an unset UISPS_DATABASE_URL opens the embedded SQLite), not act on an empty one."""
    from sqlalchemy.engine import make_url

    from core.db.migrate import schema_problem
    from core.errors import UisError
    from core.settings import get_settings

    _refuse_unknown_settings()  # a misspelt UISPS_DATABASE_URL would open an embedded database that exists
    with _migration_errors():
        url = make_url(get_settings().effective_database_url)
        problem = schema_problem(url)
    if problem:
        raise UisError(f"{problem} (is UISPS_DATABASE_URL the service's database?)")
    with _session_on(url) as session:
        yield session


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name (some containers)
        return "cli"


artifacts_app = typer.Typer(no_args_is_help=True, help="Stored checkpoints.")
app.add_typer(artifacts_app, name="artifacts")


@artifacts_app.command("gc")
@user_errors
def artifacts_gc(
    min_age_hours: Annotated[
        float, typer.Option("--min-age-hours", min=0.0, help="spare files written less than this long ago")
    ] = 24.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted; delete nothing")] = False,
) -> None:
    """Delete stored checkpoints that no unpurged version names (crashed, cancelled or lost jobs' results)."""
    from datetime import timedelta

    from core.services.models.orphans import collect_orphaned_artifacts
    from core.settings import get_settings
    from core.storage import make_artifact_store

    store = make_artifact_store(get_settings())
    with _existing_service_database() as session:
        found = collect_orphaned_artifacts(
            session, store, min_age=timedelta(hours=min_age_hours), dry_run=dry_run
        )
    for listed in found:
        typer.echo(f"{listed.key}\t{listed.size}\t{listed.modified_at.isoformat()}")
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(found)} orphaned artifacts, {sum(a.size for a in found)} bytes", err=True)


@artifacts_app.command("rekey")
@user_errors
def artifacts_rekey(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would move; write nothing")] = False,
) -> None:
    """Give each tenant its own copy of the checkpoints stored before per-tenant keys (shared
    `sha256/...` files) and delete the shared files, so no purge tells one tenant about another's.
    Exit 1 if a shared file is missing or not what its versions recorded (it is left as it is)."""
    from core.services.models.rekey import RekeyedVersion, rekey_shared_artifacts
    from core.settings import get_settings
    from core.storage import make_artifact_store

    def echo(moved: RekeyedVersion) -> None:
        typer.echo(f"{moved.tenant_id}\t{moved.model_id}\t{moved.version}\t{moved.old_key}\t{moved.new_key}")

    store = make_artifact_store(get_settings())
    with _existing_service_database() as session:
        report = rekey_shared_artifacts(session, store, dry_run=dry_run, on_moved=echo, actor=_cli_actor())
    for problem in report.problems:
        typer.echo(f"NOT MOVED: {problem}", err=True)
    verb = "would move" if dry_run else "moved"
    deleted = "" if dry_run else f"; {len(report.shared_deleted)} shared files deleted"
    typer.echo(f"{verb} {len(report.moved)} versions to their tenants' own keys{deleted}", err=True)
    if report.problems:
        raise typer.Exit(1)


@artifacts_app.command("verify")
@user_errors
def artifacts_verify(
    checksums: Annotated[
        bool, typer.Option("--checksums", help="also read every file through and check its sha256 (reads every byte)")
    ] = False,
) -> None:
    """Check that every unpurged version's checkpoint is stored, with its recorded size (and sha256);
    name each that is not (exit 1). Run it after restoring the database or the store, before gc."""
    from core.services.models.integrity import check_stored_checkpoints
    from core.settings import get_settings
    from core.storage import make_artifact_store

    store = make_artifact_store(get_settings())
    with _existing_service_database() as session:
        report = check_stored_checkpoints(session, store, checksums=checksums)
    for found in report.problems:
        typer.echo(f"{found.tenant_id}\t{found.model_id}\t{found.version}\t{found.artifact_key}\t{found.problem}")
    unnamed = (
        f"; {report.unnamed} stored files no unpurged version names (`uisps artifacts gc --dry-run` lists them)"
        if report.unnamed else ""
    )
    checked = "sizes and sha256" if checksums else "sizes"
    if report.problems:
        typer.echo(f"BROKEN: {len(report.problems)} of {report.checked} unpurged versions have no intact checkpoint "
                   f"({checked} checked){unnamed}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.checked} unpurged versions, every checkpoint stored ({checked} checked){unnamed}", err=True)


@keys_app.command("create")
@user_errors
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="the tenant the key acts for")],
    role: Annotated[str, typer.Option("--role", help="admin, compliance or reader")],
    name: Annotated[str | None, typer.Option("--name", help="a label for people (default: <role> key)")] = None,
) -> None:
    """Create an API key and print it (once: only its sha256 is stored)."""
    from core.db import ApiKeyRole
    from core.errors import UisError
    from core.services.api_keys.service import api_key_service

    roles = [r.value for r in ApiKeyRole]
    if role not in roles:
        raise UisError(f"role must be one of {', '.join(roles)}, not {role!r}")
    with _service_database() as session:
        created = api_key_service.create(
            session, tenant_id=tenant, role=role, name=name or f"{role} key", actor=_cli_actor()
        )
        session.commit()
    typer.echo(
        f"created {role} key {created.record.id} for tenant {tenant!r}; it is shown once, store it safely:", err=True
    )
    typer.echo(created.secret)


@keys_app.command("list")
@user_errors
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """List API keys (never the keys themselves: their ids, prefixes and roles)."""
    from rich.table import Table

    from core.services.api_keys.service import api_key_service
    from core.services.pagination import MAX_PAGE_SIZE, PageRequest

    rows = []
    with _existing_service_database() as session:
        token = None
        while True:
            page = api_key_service.list(session, tenant, PageRequest(MAX_PAGE_SIZE, token))
            rows.extend(page.items)
            token = page.next_page_token
            if not token:
                break
    if as_json:
        for key in rows:
            typer.echo(json.dumps({
                "id": key.id, "tenant_id": key.tenant_id, "role": key.role, "name": key.name, "prefix": key.prefix,
                "created_at": key.created_at.isoformat(),
                "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }))
        return
    table = Table()
    for column in ("id", "tenant", "role", "name", "prefix", "created", "last used", "revoked"):
        table.add_column(column)
    for key in rows:
        table.add_row(
            key.id, key.tenant_id, key.role, key.name, key.prefix + "...", _when(key.created_at),
            _when(key.last_used_at), _when(key.revoked_at),
        )
    Console(width=200).print(table)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@keys_app.command("revoke")
@user_errors
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (uisps keys list)")]) -> None:
    """Revoke an API key: refused (401) within UISPS_API_KEY_CACHE_TTL_S (5 s; API processes cache verified keys)."""
    from core.errors import UisError
    from core.services.api_keys.service import api_key_service
    from core.services.errors import NotFound

    with _service_database() as session:
        try:
            key = api_key_service.revoke(session, tenant_id=None, key_id=key_id, actor=_cli_actor())
        except NotFound as exc:
            raise UisError(str(exc)) from None
        session.commit()
    typer.echo(f"revoked {key.role} key {key.id} ({key.name}) of tenant {key.tenant_id!r}")


@audit_app.command("verify")
@user_errors
def audit_verify(
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant's chain")] = None,
) -> None:
    """Walk every tenant's hash chain; name the first broken link of each (exit 1), else print OK."""
    from core.db.audit import walk_chains

    with _existing_service_database() as session:  # a wrong UISPS_HOME must not verify an empty new database
        report = walk_chains(session, tenant)
    total = sum(report.events.values())
    if report.intact:
        typer.echo(f"OK: {total} audit events in {len(report.events)} tenant chain(s), every link intact")
        return
    for broken in report.breaks:
        typer.echo(
            f"BROKEN: tenant {broken.tenant_id!r}: audit event {broken.event_id} "
            f"({broken.action} at {broken.occurred_at.isoformat()}): {broken.reason}"
        )
    intact = len(report.events) - len(report.breaks)
    typer.echo(f"{len(report.breaks)} broken chain(s), {intact} intact, {total} events in all")
    raise typer.Exit(1)


@certificate_app.command("verify")
@user_errors
def certificate_verify(
    file: Annotated[Path, typer.Argument(help="a certificate downloaded from GET /deletion-requests/{id}/certificate")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="PEM public key (GET /certificate-keys); default: this machine's signing key and its retired keys",
        ),
    ] = None,
) -> None:
    """Check a deletion certificate's signature (exit 0 valid, 1 invalid, 2 when it cannot be read)."""
    from core.certificates import (
        InvalidCertificate,
        KeyFileError,
        load_public_key_pem,
        parse_certificate,
        verify_certificate,
        verify_with_service_keys,
    )
    from core.settings import get_settings

    settings = get_settings()
    try:
        key = load_public_key_pem(public_key.read_bytes()) if public_key is not None else None
        text = file.read_bytes().decode("utf-8")  # what the service sends, whatever this machine's locale
    except UnicodeDecodeError:
        typer.echo(f"error: {file} is not a certificate (not UTF-8 text)", err=True)
        raise typer.Exit(2) from None
    except (OSError, KeyFileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        document = parse_certificate(text)
        if key is not None:
            certificate, status = verify_certificate(document, key), None
        else:
            certificate, status = verify_with_service_keys(
                document, settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
            )
    except json.JSONDecodeError as exc:
        typer.echo(f"INVALID: {file} is not JSON ({exc})")
        raise typer.Exit(1) from None
    except RecursionError:  # JSON nested thousands deep: no certificate is
        typer.echo(f"INVALID: {file} is nested too deeply to be a certificate")
        raise typer.Exit(1) from None
    except InvalidCertificate as exc:
        typer.echo(f"INVALID: {exc}")
        raise typer.Exit(1) from None
    except (OSError, KeyFileError) as exc:  # this machine's keys, read by key_id
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    labels = certificate.get("labels", {}).get("forgotten")
    new = certificate.get("new_checkpoint", {})
    by = f" (signed by the retired key {document['signature']['key_id']})" if status == "retired" else ""
    typer.echo(
        f"OK: deletion request {certificate.get('request_id')} of tenant {certificate.get('tenant_id')!r}: "
        f"labels {labels} forgotten, version {new.get('version')} sha256 {new.get('sha256')}{by}"
    )


@certificate_app.command("rotate-key")
@user_errors
def certificate_rotate_key() -> None:
    """Retire the certificate signing key (its public half is kept, so what it signed still verifies)
    and sign with a new one from now on; running API processes switch at their next certificate."""
    from core.certificates import rotate_signing_key
    from core.settings import get_settings

    settings = get_settings()
    try:
        rotation = rotate_signing_key(
            settings.effective_certificate_key_path, settings.effective_certificate_retired_keys_dir
        )
    except OSError as exc:  # a read-only folder, say
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"retired key {rotation.retired_key_id}: its public half is {rotation.retired_file}")
    typer.echo(f"new signing key {rotation.new_key_id} at {settings.effective_certificate_key_path}")
    typer.echo(
        "a leaked key: delete its public half above so nothing it signed verifies, and have clients "
        "download their certificates again (docs/deploy.md, Rotating the certificate signing key)",
        err=True,
    )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
