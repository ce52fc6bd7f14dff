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
    from core.checkpoint import save_checkpoint
    from core.config import TrainConfig
    from core.data import load_dataset
    from core.workflow import evaluate_model, train_model

    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, precision=precision)
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
    from pydantic import ValidationError

    from core.checkpoint import load_checkpoint, save_checkpoint, sha256_file
    from core.config import UnlearnConfig
    from core.data import load_dataset
    from core.errors import UisError
    from core.workflow import unlearn_model

    labels = parse_labels(forget)
    try:
        cfg = UnlearnConfig.model_validate_json(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise UisError(f"--params: {where}: {err['msg']}") from None
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
def serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="run the API only")] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the HTTP API and, unless --no-worker, a local worker process (stopped with the API)."""
    import uvicorn

    from core.db.migrate import upgrade
    from core.settings import get_settings
    from uisps.local import stop_process

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    # Migrate before the worker starts: its start-up sweep reads the deletion_requests table.
    upgrade(settings.effective_database_url)
    worker = None if no_worker else _spawn_worker()
    try:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level=log_level)
    finally:
        stop_process(worker, WORKER_STOP_GRACE_S)


def _spawn_worker():  # noqa: ANN202
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "worker", "--loglevel=INFO"])


@app.command()
def worker(
    pool: Annotated[str, typer.Option("--pool", help="prefork (default) or solo")] = "prefork",
    concurrency: Annotated[int, typer.Option("--concurrency", help="jobs at once (each may use a whole GPU)")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run a Celery worker that executes deletion requests (settings from UISPS_* variables)."""
    from worker.main import start_worker

    start_worker(pool=pool, concurrency=concurrency, loglevel=loglevel)


@contextmanager
def _migration_errors() -> Iterator[None]:
    """An unknown revision or an unreachable database: one line, not Alembic's traceback."""
    from alembic.util import CommandError
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except CommandError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OperationalError as exc:
        typer.echo(f"error: cannot reach the database: {str(exc.orig).strip().splitlines()[0]}", err=True)
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Option("--revision")] = "head") -> None:
    """Migrate the database (UISPS_DATABASE_URL, or the embedded SQLite) up to a revision."""
    from core.db.migrate import current_revision, upgrade
    from core.settings import get_settings

    url = get_settings().effective_database_url
    with _migration_errors():
        upgrade(url, revision)
        typer.echo(f"database at revision {current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Option("--revision", help="target; 'base' removes every table")] = "-1",
) -> None:
    """Migrate the database down (one revision by default)."""
    from core.db.migrate import current_revision, downgrade
    from core.settings import get_settings

    url = get_settings().effective_database_url
    with _migration_errors():
        downgrade(url, revision)
        typer.echo(f"database at revision {current_revision(url)}")


@app.command()
def demo(
    home: Annotated[Path | None, typer.Option("--home", help="UISPS_HOME to use (default: a fresh temporary folder)")] = None,
    forget: Annotated[int, typer.Option("--forget", help="the digit to forget")] = 3,
    fast: Annotated[bool, typer.Option("--fast", help="tiny hyperparameters instead of the defaults")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the temporary UISPS_HOME")] = False,
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
    seeds: Annotated[int | None, typer.Option("--seeds", help="seeds per row (default: the preset's)")] = None,
    time_budget: Annotated[float | None, typer.Option(
        "--time-budget", help="seconds; no new row starts after this (finished rows are kept)")] = None,
    experiments: Annotated[str, typer.Option(
        "--experiments", help="comma-separated subset of main,ablation,alpha,lambda,retain_fraction")] = "",
    order: Annotated[str, typer.Option(
        "--order", help="seed: every experiment (in priority order) per seed; experiment: all seeds of one first")] = "seed",
    preset_json: Annotated[str, typer.Option("--preset-json", help="JSON overrides of the preset's fields")] = "{}",
) -> None:
    """Re-run the paper's tables (UISPS against the baselines); rows are written as they finish."""
    import os

    from core.bench_paper import EXPERIMENTS, PaperBench, make_preset
    from core.data import load_dataset
    from core.errors import UisError

    try:
        overrides = json.loads(preset_json)
        chosen = make_preset(preset, overrides)
        wanted = [e.strip() for e in experiments.split(",") if e.strip()] or list(EXPERIMENTS)
        spec = data or chosen.data or os.environ.get("UISPS_CIFAR10_SUBSET")
        if spec and preset == "full" and not data and ":" not in spec:
            spec = f"npz:{spec}"
        if not spec:
            raise UisError("the full preset needs --data npz:<cifar10_subset.npz> (or $UISPS_CIFAR10_SUBSET)")
        bench = PaperBench(chosen, load_dataset(spec), _device(device), out, wanted, seeds, time_budget, order,
                           log=lambda line: typer.echo(line, err=True))
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
    from core.config import UnlearnConfig

    dev = _device(device)
    setup = PerfSetup(arch=arch, data=data, retrain_epochs_timed=retrain_epochs, precision=precision)
    result = run_perf(setup, UnlearnConfig.model_validate_json(params), dev)
    out.mkdir(parents=True, exist_ok=True)
    name = f"perf-{dev.type}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    typer.echo(markdown(result))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
