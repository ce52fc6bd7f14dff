"""Checkpoints are safetensors with a manifest; anything else is refused without executing it."""

import io
import json
import pickle
import struct
import zipfile

import pytest
import torch

from core.checkpoint import Manifest, checkpoint_bytes, load_checkpoint, load_checkpoint_bytes, save_checkpoint
from core.errors import CheckpointError


def test_round_trip_keeps_weights_and_manifest(trained_digits, tmp_path):
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(path, trained_digits.model, trained_digits.manifest)
    model, manifest = load_checkpoint(path)
    assert manifest == trained_digits.manifest
    assert len(sha) == 64
    for k, v in trained_digits.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def _mutate_header(data: bytes, fn) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.mark.parametrize(
    "name, make",
    [
        ("pickle", lambda good: pickle.dumps(_Payload())),
        ("torch zip", lambda good: _zip_bytes()),
        ("empty", lambda good: b""),
        ("header overflow", lambda good: struct.pack("<Q", 2**63) + good[8:]),
        ("overlapping offsets", lambda good: _mutate_header(good, _overlap)),
        ("wrong dtype", lambda good: _mutate_header(good, _bad_dtype)),
    ],
)
def test_malformed_or_malicious_checkpoints_are_refused_without_side_effects(name, make, trained_digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    with pytest.raises(CheckpointError):
        load_checkpoint_bytes(make(good))
    assert not (tmp_path / "PWNED").exists()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload()))
    return buf.getvalue()


def _overlap(header: dict) -> None:
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = a["data_offsets"]
    else:
        header[names[0]]["data_offsets"] = [0, a["data_offsets"][1] - a["data_offsets"][0]]
        header[names[1]]["data_offsets"] = [0, b["data_offsets"][1] - b["data_offsets"][0]]


def _bad_dtype(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "U8"


def test_wrong_shapes_are_refused(trained_digits):
    other = Manifest(**{**trained_digits.manifest.model_dump(), "num_classes": 5})
    data = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint_bytes(data, expected=other)


def test_nan_weights_are_refused(trained_digits, digits_copy):
    with torch.no_grad():
        digits_copy.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint_bytes(checkpoint_bytes(digits_copy, trained_digits.manifest))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
