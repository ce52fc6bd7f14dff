"""Checkpoints are safetensors with a manifest; anything else is refused without executing it."""

import io
import json
import pickle
import struct
import zipfile

import pytest
import torch

from safetensors.torch import save as st_save

from core.checkpoint import (
    MANIFEST_KEY,
    Manifest,
    checkpoint_bytes,
    load_checkpoint,
    load_checkpoint_bytes,
    parse_header,
    save_checkpoint,
)
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
    "name, message, make",
    [
        ("pickle", "Python pickle", lambda good: pickle.dumps(_Payload())),
        ("torch zip", "zip archive", lambda good: _zip_bytes()),
        ("empty", "too short", lambda good: b""),
        ("header overflow", "header length .* out of bounds", lambda good: struct.pack("<Q", 2**63) + good[8:]),
        ("overlapping offsets", "overlap", lambda good: _mutate_header(good, _overlap)),
        ("wrong dtype", "dtype U8 is not allowed", lambda good: _mutate_header(good, _bad_dtype)),
        ("shape not a list", "malformed header entry", lambda good: _mutate_header(good, lambda h: _first_tensor(h).update(shape=5))),
        ("dtype not a string", "malformed header entry", lambda good: _mutate_header(good, lambda h: _first_tensor(h).update(dtype=["F32"]))),
        ("header nested too deep", "header is not JSON", lambda good: _raw_header(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        ("integer beyond Python's digit limit", "header is not JSON", lambda good: _raw_header(
            b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'
        )),
    ],
)
def test_malformed_or_malicious_checkpoints_are_refused_without_side_effects(name, message, make, trained_digits, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    with pytest.raises(CheckpointError, match=message):
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


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _raw_header(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _bad_dtype(header: dict) -> None:
    _first_tensor(header)["dtype"] = "U8"


def test_a_boolean_in_a_shape_is_not_read_as_a_dimension(trained_digits):
    # [true, n] would count n elements, the right size for the data, if JSON's true passed as 1
    good = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    parse_header(good)
    bad = _mutate_header(good, lambda h: _first_tensor(h).update(shape=[True, *_first_tensor(h)["shape"]]))
    with pytest.raises(CheckpointError, match="bad shape"):
        parse_header(bad)


def test_a_shape_of_more_dimensions_than_a_tensor_has_is_refused_before_its_size_is_counted(trained_digits):
    # A shape list of a million entries would take minutes to multiply out, and fits the header limit.
    good = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    bad = _mutate_header(good, lambda h: _first_tensor(h).update(shape=[1] * 9 + _first_tensor(h)["shape"]))
    with pytest.raises(CheckpointError, match="dimensions"):
        parse_header(bad)


def test_wrong_shapes_are_refused(trained_digits):
    other = Manifest(**{**trained_digits.manifest.model_dump(), "num_classes": 5, "class_names": list("01234")})
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


def test_a_real_safetensors_file_starting_like_a_pickle_is_still_read():
    # A header 0x0280 bytes long starts with b"\x80\x02", like a protocol-2 pickle: the content
    # check must look further (byte 8 opens the JSON header) before calling it one.
    from safetensors.torch import save as st_save

    from core.checkpoint import parse_header

    data = st_save({"w": torch.zeros(2)}, metadata={"pad": ""})
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length].rstrip()
    padded = header + b" " * (0x0280 - len(header))
    data = struct.pack("<Q", len(padded)) + padded + data[8 + length :]
    assert data[:2] == b"\x80\x02"

    assert set(parse_header(data)) == {"__metadata__", "w"}


def test_content_decides_not_the_name_and_the_message_says_what_it_is(tmp_path):
    from core.checkpoint import parse_header

    with pytest.raises(CheckpointError, match="Python pickle .*never loaded"):
        parse_header(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(CheckpointError, match="zip archive, the format of torch.save"):
        parse_header(_zip_bytes())
    with pytest.raises(CheckpointError, match="looks like a Python pickle"):
        parse_header(pickle.dumps([1, 2], protocol=0))


def test_the_parameter_count_is_capped_before_anything_is_built(trained_digits):
    from core.checkpoint import parse_header

    data = checkpoint_bytes(trained_digits.model, trained_digits.manifest)
    total = sum(t.numel() for t in trained_digits.model.state_dict().values())

    assert parse_header(data, max_parameters=total)
    with pytest.raises(CheckpointError, match=f"more than {total - 1} parameters"):
        load_checkpoint_bytes(data, max_parameters=total - 1)


def test_a_file_that_cannot_fit_is_refused_before_the_model_is_built(trained_digits, monkeypatch):
    # A few bytes naming a registered architecture must not cost the API that model's memory.
    from safetensors.torch import save as st_save

    import core.checkpoint

    def build_model(*_args):  # noqa: ANN202
        raise AssertionError("the model was built for a file that cannot fit it")

    monkeypatch.setattr(core.checkpoint, "build_model", build_model)
    big = Manifest(**{**trained_digits.manifest.model_dump(), "architecture": "resnet18", "in_channels": 1})
    for data in (st_save({}), checkpoint_bytes(trained_digits.model, trained_digits.manifest)):
        with pytest.raises(CheckpointError, match="do not match the architecture"):
            load_checkpoint_bytes(data, expected=big)


def test_nothing_in_the_service_unpickles():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    unpickling = re.compile(
        r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|import (joblib|dill|cloudpickle|shelve)|"
        r"marshal\.loads?\(|Unpickler|numpy\.load\(.*allow_pickle"
    )
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for package in ("core", "api", "worker", "uisps", "migrations", "scripts")
        for path in (root / package).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if unpickling.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": 99}, "format"),
        ({"forgotten_labels": [99]}, "forgotten_labels"),
        ({"forgotten_labels": list(range(10))}, "every class"),
        ({"class_names": ["a", "b"]}, "2 class_names for num_classes 10"),
        ({"mean": [0.1, 0.2]}, "channels"),
    ],
)
def test_a_manifest_that_contradicts_itself_is_refused(trained_digits, change, message):
    manifest = {**json.loads(trained_digits.manifest.model_dump_json()), **change}
    state = {k: v.contiguous() for k, v in trained_digits.model.state_dict().items()}
    data = st_save(state, metadata={MANIFEST_KEY: json.dumps(manifest)})

    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_bytes(data)


def test_a_model_whose_loader_reads_module_versions_loads_from_its_checkpoint() -> None:
    # safetensors keeps tensors only; torchvision's MNASNet refuses a state without its version
    from core.architectures import build_model

    manifest = Manifest(architecture="torchvision:mnasnet0_5", in_channels=3, num_classes=3, input_shape=[3, 32, 32],
                        class_names=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3)
    model = build_model(manifest.architecture, 3, 3)

    loaded, _ = load_checkpoint_bytes(checkpoint_bytes(model, manifest))

    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))
