"""The `uisps` command line as a user runs it (real subprocesses, digits data)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FAST = json.dumps({"inversion": {"iterations": 300}, "precision": "fp32"})


def uisps(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uisps", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    run = uisps("train", "--dataset", "digits", "--arch", "smallcnn", "--epochs", "15", "--lr", "0.1",
                "--precision", "fp32", "--out", "m.safetensors", cwd=work)
    assert run.returncode == 0, run.stderr
    return work


def test_train_unlearn_evaluate_forgets_one_digit(trained):
    run = uisps("unlearn", "--checkpoint", "m.safetensors", "--dataset", "digits", "--forget", "3",
                "--out", "m2.safetensors", "--report", "r.json", "--params", FAST, cwd=trained)
    assert run.returncode == 0, run.stderr
    report = json.loads((trained / "r.json").read_text())
    assert report["forget_labels"] == [3]
    assert report["before"]["acc_forget"] > 90 and report["after"]["acc_forget"] <= 1.0
    assert report["after"]["acc_retain"] >= report["before"]["acc_retain"] - 3.0
    assert {"inversion", "fisher", "relabel", "unlearning", "evaluation"} <= report["timings"].keys()
    assert 0 < report["frozen_fraction"] < 1 and 0 <= report["after"]["mia"] <= 100
    import hashlib
    assert hashlib.sha256((trained / "m2.safetensors").read_bytes()).hexdigest() == report["checkpoint_sha256"]
    ev = uisps("evaluate", "--checkpoint", "m2.safetensors", "--dataset", "digits", "--forget", "3", "--json", cwd=trained)
    assert ev.returncode == 0, ev.stderr
    evaluation = json.loads(ev.stdout)
    assert evaluation["acc_forget"] == report["after"]["acc_forget"]
    assert {"acc_retain", "acc_forget", "mia"} <= evaluation.keys()


def _write_npz(path: Path, shape: tuple, test_shape: tuple | None = None, labels: range = range(10)) -> None:
    import numpy as np
    x = np.zeros((10, *shape), dtype=np.uint8)
    x_test = np.zeros((10, *(test_shape or shape)), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.array(labels), x_test=x_test, y_test=np.array(labels),
             classes=np.array([str(c) for c in range(10)]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--forget", "12"], "out of range"),
        (["--forget", "0,1,2,3,4,5,6,7,8,9"], "every class"),
        (["--forget", "a"], "comma-separated"),
        (["--checkpoint", "missing.safetensors"], "not found"),
        (["--checkpoint", "junk.bin"], "safetensors"),
        (["--dataset", "npz:rgb.npz"], "expects"),
        (["--params", '{"alpha": -1}'], "params"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "cuda:99"], "device 'cuda:99': this machine has"),
        (["--checkpoint", "."], "is a folder, not a checkpoint"),
        (["--dataset", "npz:sizes.npz"], "x_test images are (1, 9, 9)"),
        (["--dataset", "npz:labels.npz"], "labels from -1 to 8"),
        # checked before the job runs, so no checkpoint is left behind by a report that cannot be written
        (["--report", "afile/r.json"], "afile is a file"),
        (["--report", "."], "--report: . is a folder"),
        (["--out", "."], "--out: . is a folder"),
        # a folder nothing can be made in, root included (os.access says yes to root everywhere)
        *([(["--out", "/proc/uisps-none/o.safetensors"], "--out: cannot write in /proc"),
           (["--report", "/proc/version"], "--report: cannot write /proc/version")]  # an existing file, written in place
          if sys.platform == "linux" else []),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(trained, args, message):
    (trained / "junk.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle, never loaded
    (trained / "afile").write_text("a file where a folder should be")
    _write_npz(trained / "rgb.npz", (32, 32, 3))
    _write_npz(trained / "sizes.npz", (8, 8), test_shape=(9, 9))
    _write_npz(trained / "labels.npz", (8, 8), labels=range(-1, 9))
    base = {"--checkpoint": "m.safetensors", "--dataset": "digits", "--forget": "3",
            "--out": "never.safetensors", "--report": "never.json"}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [item for pair in base.items() for item in pair]
    run = uisps("unlearn", *flat, cwd=trained)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not (trained / "never.safetensors").exists() and not (trained / "never.json").exists()


@pytest.mark.parametrize("args, message", [(["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
                                           (["--out", "."], "--out: . is a folder")])
def test_bad_training_settings_are_one_clear_line(tmp_path, args, message):
    base = {"--dataset": "digits", "--epochs": "1", "--out": "m.safetensors"} | dict(zip(args[::2], args[1::2]))
    run = uisps("train", *[item for pair in base.items() for item in pair], cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_a_written_checkpoint_has_a_new_files_usual_mode(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)  # inherited by the command
    try:
        run = uisps("train", "--dataset", "digits", "--epochs", "1", "--out", "m.safetensors", cwd=tmp_path)
    finally:
        os.umask(previous)
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644  # readable by others, not 0600


def test_a_local_service_uses_none_of_the_shells_uisps_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo on an operator's machine must neither sign with the production key nor wait on a
    # GPU this machine lacks.
    from uisps.local import service_env

    monkeypatch.setenv("UISPS_CERTIFICATE_KEY_PATH", "/etc/uisps/signing.pem")
    monkeypatch.setenv("UISPS_DEVICE", "cuda:1")

    env = service_env(tmp_path, {"UISPS_MAX_ATTEMPTS": "1"})

    assert {k for k in env if k.startswith("UISPS_")} == {"UISPS_HOME", "UISPS_MAX_ATTEMPTS"}
    assert env["UISPS_HOME"] == str(tmp_path)


def test_a_local_services_keys_are_made_whatever_the_shells_uisps_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an operator's shell may hold settings that are incomplete on their own: the demo must not stop on them
    from uisps.local import create_api_key

    monkeypatch.setenv("UISPS_ARTIFACT_BACKEND", "s3")  # without UISPS_S3_BUCKET: invalid as Settings
    monkeypatch.setenv("UISPS_DATABASE_URL", "postgresql+psycopg://prod.example/uisps")  # never this one

    key = create_api_key(tmp_path, "admin")

    assert key and (tmp_path / "uisps.db").is_file()
