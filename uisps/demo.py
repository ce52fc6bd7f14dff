"""`uisps demo`: the whole flow on a fresh embedded service, from training to a verified download.

Train a small CNN on the bundled digits, register it over HTTP, ask the service to forget one
digit, follow the job, download the new version, check its sha256, evaluate it locally and show
the metrics before and after. Runs the API and a worker as subprocesses, then stops them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.certificates import load_public_key_pem, verify_certificate
from uisps.client import ServiceError, UispsClient
from uisps.local import LocalService

# Tiny settings that forget a digit in seconds on a CPU (the tests use them too).
FAST_PARAMS: dict[str, Any] = {"inversion": {"iterations": 200}, "lr": 0.1, "batch_size": 64, "precision": "fp32"}
TRAIN_EPOCHS = 15
TRAIN_LR = 0.1
READY_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DemoResult:
    model_id: str
    request: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    sha256: str


def train_digits_checkpoint(progress: Callable[[str, int, int], None] | None = None) -> bytes:
    """A smallcnn trained on digits, as safetensors bytes (a few seconds on a CPU)."""
    import torch

    from core.checkpoint import checkpoint_bytes
    from core.config import TrainConfig
    from core.data import load_dataset
    from core.progress import no_progress
    from core.workflow import train_model

    config = TrainConfig(epochs=TRAIN_EPOCHS, lr=TRAIN_LR, precision="fp32")
    model, manifest = train_model(
        load_dataset("digits"), "smallcnn", config, torch.device("cpu"), progress=progress or no_progress
    )
    return checkpoint_bytes(model, manifest)


def model_spec_of(checkpoint: bytes, name: str) -> dict[str, Any]:
    """The POST /models body describing a checkpoint written by core (its manifest says it all)."""
    from core.checkpoint import parse_header, read_manifest

    manifest = read_manifest(parse_header(checkpoint))
    return {
        "name": name,
        "architecture": manifest.architecture,
        "class_names": manifest.class_names,
        "input_shape": manifest.input_shape,
        "mean": manifest.mean,
        "std": manifest.std,
        "data_source": manifest.data_source or "digits",
    }


def evaluate_checkpoint(checkpoint: bytes, forget: list[int]) -> dict[str, Any]:
    import torch

    from core.checkpoint import load_checkpoint_bytes
    from core.data import load_dataset
    from core.workflow import evaluate_model

    model, manifest = load_checkpoint_bytes(checkpoint)
    dataset = load_dataset(manifest.data_source or "digits")
    return evaluate_model(model, manifest, dataset, forget, torch.device("cpu")).as_dict()


def run_demo(
    *, home: Path | None, forget: int, fast: bool, keep: bool, console: Console, err_console: Console
) -> DemoResult:
    temporary = home is None
    home = Path(tempfile.mkdtemp(prefix="uisps-demo-")) if home is None else home.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "demo-server.log"
    err_console.print(f"[dim]UISPS_HOME={home} (server log: {log_path})[/dim]")
    succeeded = False
    try:
        with log_path.open("ab") as log, LocalService(home, log=log) as service:
            # Train while the API and the worker start.
            with _bars(err_console) as bar:
                task = bar.add_task("training", total=None)
                checkpoint = train_digits_checkpoint(lambda _s, done, total: bar.update(task, completed=done, total=total))
            with UispsClient(service.url) as anonymous:
                anonymous.wait_ready(READY_TIMEOUT_S, alive=service.alive)
            # The fresh home has no keys: an admin registers the model, compliance asks to forget.
            admin_key = service.create_api_key("admin", name="demo admin")
            compliance_key = service.create_api_key("compliance", name="demo compliance")
            err_console.print("[dim]created API keys 'demo admin' and 'demo compliance' (tenant default)[/dim]")
            with (
                UispsClient(service.url, api_key=admin_key) as admin,
                UispsClient(service.url, api_key=compliance_key) as compliance,
            ):
                result = _flow(admin, compliance, checkpoint, forget, fast, console, err_console, service.alive)
                succeeded = True
                return result
    finally:
        if temporary and not keep and succeeded:
            shutil.rmtree(home, ignore_errors=True)
        elif temporary and not keep:  # the error is one line; the log with the rest must outlive the run
            err_console.print(f"kept UISPS_HOME={home} for its server log {log_path}", markup=False)


def _flow(
    admin: UispsClient,
    client: UispsClient,
    checkpoint: bytes,
    forget: int,
    fast: bool,
    console: Console,
    err_console: Console,
    alive: Callable[[], bool],
) -> DemoResult:
    model = admin.create_model(model_spec_of(checkpoint, "digits-smallcnn"))
    v1 = admin.upload_version(model["id"], checkpoint, "digits-smallcnn.safetensors")
    err_console.print(f"registered model {model['id']}, version 1 sha256 {v1['sha256'][:16]}...")
    request = client.create_deletion_request(model["id"], [forget], params=FAST_PARAMS if fast else None)
    err_console.print(f"deletion request {request['id']}: forget digit {forget}")
    with _bars(err_console) as bar:
        task = bar.add_task("queued", total=1.0)

        def show(update: dict[str, Any]) -> None:
            bar.update(task, completed=update["progress"], description=update["stage"] or update["state"])

        request = client.wait_for(request["id"], timeout_s=JOB_TIMEOUT_S, on_update=show, alive=alive)
    if request["state"] != "succeeded":
        error = request.get("error") or {}
        raise ServiceError(f"deletion request {request['state']}: {error.get('code')}: {error.get('message')}")
    version = request["result_version"]
    downloaded = client.download_checkpoint(model["id"], version)
    before = evaluate_checkpoint(checkpoint, [forget])
    after = evaluate_checkpoint(downloaded.data, [forget])
    console.print(_table(forget, version, before, after))
    console.print(f"version {version} sha256 {downloaded.sha256} (verified against the header and the version resource)")
    certificate = client.get_certificate(request["id"])
    verify_certificate(certificate, load_public_key_pem(client.certificate_key()))
    console.print(f"deletion certificate signed by {certificate['signature']['key_id'][:23]}... (signature verified)")
    purged = client.purge_checkpoint(model["id"], request["base_version"])
    console.print(
        f"version {purged['version']} checkpoint purged at {purged['checkpoint_purged_at']} "
        f"(it still knew digit {forget}; its record and sha256 stay)"
    )
    return DemoResult(model["id"], request, before, after, downloaded.sha256)


def _table(forget: int, version: int, before: dict[str, Any], after: dict[str, Any]) -> Table:
    table = Table(title=f"Forgetting digit {forget} (test split; MIA on its training samples)")
    table.add_column("metric")
    table.add_column("version 1", justify="right")
    table.add_column(f"version {version}", justify="right")
    for key, label in (("acc_retain", "A_Dr %"), ("acc_forget", "A_Df %"), ("mia", "MIA %")):
        table.add_row(label, _fmt(before[key]), _fmt(after[key]))
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bars(console: Console) -> Progress:
    columns = (TextColumn("{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)
