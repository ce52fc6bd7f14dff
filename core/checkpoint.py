"""Checkpoints: a safetensors file whose header metadata carries a JSON manifest.

Nothing here unpickles: a checkpoint is recognised by its first bytes (a pickle or a torch.save
zip is refused with what it is), parsed as safetensors after its header has been checked (length
cap, dtype allowlist, parameter-count cap, offsets contiguous and inside the file), and its
tensors must match the architecture the manifest names (names, shapes, dtypes) and be finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.architectures import build_model, model_skeleton
from core.errors import CheckpointError, UisError

MANIFEST_KEY = "uisps.manifest"
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSOR_DIMS = 8  # a classifier's tensors have at most 5 (Conv3d weights)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


class Manifest(BaseModel):
    """What a checkpoint needs to be rebuilt and used: travels inside the file."""

    model_config = ConfigDict(extra="forbid")

    # A later format may mean something this code would misread: refused, not guessed at.
    format: Literal[1] = 1
    architecture: str
    in_channels: int = Field(ge=1, le=64)
    num_classes: int = Field(ge=2, le=100_000)
    input_shape: list[int] = Field(min_length=3, max_length=3)
    class_names: list[str]
    mean: list[float]
    std: list[float]
    forgotten_labels: list[int] = Field(default_factory=list)
    data_source: str | None = None
    parent_sha256: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if not self.input_shape[0] == len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(f"input_shape, mean and std must all have in_channels ({self.in_channels}) channels")
        labels = self.forgotten_labels
        if len(set(labels)) != len(labels) or any(not 0 <= label < self.num_classes for label in labels):
            raise ValueError(f"forgotten_labels {labels[:10]} must be distinct labels in 0..{self.num_classes - 1}")
        if len(labels) >= self.num_classes:
            raise ValueError("forgotten_labels name every class")
        return self


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_bytes(model: torch.nn.Module, manifest: Manifest) -> bytes:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return st_save(state, metadata={MANIFEST_KEY: manifest.model_dump_json()})


def save_checkpoint(path: Path, model: torch.nn.Module, manifest: Manifest) -> str:
    """Write atomically (temp file + rename) and return the file's sha256."""
    data = checkpoint_bytes(model, manifest)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp, which makes the file 0600: the checkpoint gets the mode any new file would (umask).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


# Formats people upload by mistake, recognised by their first bytes (never by their name).
_SAFETENSORS_ADVICE = (
    "convert it to safetensors first, e.g. safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


def sniff_format(data: bytes) -> str | None:
    """What a non-safetensors file looks like, from its first bytes: a message, or None."""
    head = data[:16]
    if head.startswith(_ZIP_MAGICS):
        return (
            "this is a zip archive, the format of torch.save (.pt/.pth files), which holds a pickle; "
            f"pickles can run arbitrary code when loaded and are never loaded here: {_SAFETENSORS_ADVICE}"
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            f"this is a Python pickle (protocol {head[1]}, e.g. torch.save's legacy format); pickles can run "
            f"arbitrary code when loaded and are never loaded here: {_SAFETENSORS_ADVICE}"
        )
    if head.startswith(b"\x93NUMPY"):
        return f"this is a NumPy .npy array, not a checkpoint: {_SAFETENSORS_ADVICE}"
    if head.startswith(b"\x89HDF"):
        return "this is an HDF5 file (e.g. Keras), not a safetensors checkpoint"
    if head.startswith(b"\x1f\x8b"):
        return "this is a gzip file; upload the uncompressed safetensors checkpoint"
    if head[:1] in (b"(", b"]", b"}", b"c", b"I", b"S", b"V", b"N") and data.endswith(b"."):
        return f"this looks like a Python pickle (protocol 0 or 1); it is never loaded here: {_SAFETENSORS_ADVICE}"
    return None


def parse_header(data: bytes, max_parameters: int | None = None) -> dict:
    """Check the safetensors framing before any tensor is materialised.

    A file that is not safetensors is recognised by its first bytes (pickle, torch.save zip, ...)
    and refused with what it is; `max_parameters` caps the number of elements of all tensors.
    """
    looks_like_safetensors = len(data) >= 9 and data[8:9] == b"{"
    if not looks_like_safetensors:
        known = sniff_format(data)
        if known is not None:
            raise CheckpointError(f"not a safetensors file: {known}")
    if len(data) < 8:
        raise CheckpointError("not a safetensors file: too short")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise CheckpointError(
            f"not a safetensors file: the header length ({header_len} bytes) is out of bounds "
            f"(the file has {len(data)} bytes; headers are at most {MAX_HEADER_BYTES})"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    # Deep nesting fits the size limit (RecursionError); an integer of more than 4,300 digits is a
    # plain ValueError (Python's int_max_str_digits), as JSONDecodeError and UnicodeDecodeError are.
    except (ValueError, RecursionError):
        raise CheckpointError("not a safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file: header is not a JSON object")
    body = len(data) - 8 - header_len
    spans = []
    parameters = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"tensor {name!r}: malformed header entry") from None
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise CheckpointError(f"tensor {name!r}: malformed header entry")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} is not allowed")
        # A long shape list would make the product below cost time quadratic in the header's size.
        if len(shape) > MAX_TENSOR_DIMS:
            raise CheckpointError(f"tensor {name!r}: {len(shape)} dimensions (at most {MAX_TENSOR_DIMS})")
        numel = 1
        for d in shape:
            if type(d) is not int or d < 0:  # not isinstance: JSON's true would pass as 1
                raise CheckpointError(f"tensor {name!r}: bad shape {shape}")
            numel *= d
        parameters += numel
        if max_parameters is not None and parameters > max_parameters:
            raise CheckpointError(
                f"the checkpoint holds more than {max_parameters} parameters (the limit, "
                "UISPS_MAX_CHECKPOINT_PARAMETERS)"
            )
        if not (type(start) is int and type(end) is int and 0 <= start <= end <= body):
            raise CheckpointError(f"tensor {name!r}: data offsets lie outside the file")
        if end - start != numel * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"tensor {name!r}: data size does not match its shape and dtype")
        spans.append((start, end))
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise CheckpointError(
                "tensor data overlap" if start < pos else "tensor data leave gaps"
            )
        pos = end
    if pos != body:
        raise CheckpointError("tensor data do not cover the file")
    return header


def read_manifest(header: dict) -> Manifest:
    meta = header.get("__metadata__") or {}
    if MANIFEST_KEY not in meta:
        raise CheckpointError(f"checkpoint has no {MANIFEST_KEY} metadata")
    try:
        return Manifest.model_validate_json(meta[MANIFEST_KEY])
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise CheckpointError(f"checkpoint manifest is invalid: {where + ': ' if where else ''}{error['msg']}") from None


def validate_header(header: dict, model: torch.nn.Module) -> None:
    """Names, shapes and dtypes from a parsed header (parse_header) against `model` (a skeleton
    will do): a file that cannot fit is refused before any tensor is built. safetensors then
    builds every tensor as its header says, so this is the only layout check needed."""
    found = {name: (info["shape"], DTYPES[info["dtype"]]) for name, info in header.items() if name != "__metadata__"}
    expected = model.state_dict()
    missing, extra = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or extra:
        raise CheckpointError(
            f"tensors do not match the architecture: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    for name, ref in expected.items():
        shape, dtype = found[name]
        if list(shape) != list(ref.shape):
            raise CheckpointError(f"tensor {name!r}: shape {list(shape)} != expected {list(ref.shape)}")
        if dtype != ref.dtype:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} != expected {ref.dtype}")


# What a checkpoint's own manifest must share with the model it is uploaded to: the network and
# the input it expects. Not its history (forgotten labels, parent) nor where its data lives.
AGREEING_FIELDS = ("architecture", "in_channels", "num_classes", "input_shape", "class_names", "mean", "std")


def check_manifest_agrees(header: dict, registered: Manifest) -> None:
    """A checkpoint that carries a manifest must agree with the registration on AGREEING_FIELDS:
    otherwise the service would run it with another normalisation or other class names than it
    was trained with (forgetting label 3 would then forget some other class)."""
    if MANIFEST_KEY not in (header.get("__metadata__") or {}):
        return  # a plain safetensors file: the registration is all there is to go by
    found = read_manifest(header)
    # A model registered with num_classes only has placeholder names ("0".."N-1"): no claim to
    # check against a manifest that names its classes. But a manifest with those very names in
    # another order says that label i is another class than the registration's i (the digits,
    # whose real names are "0".."9", or a file relabelled by hand): that disagreement stands.
    placeholders = [str(i) for i in range(registered.num_classes)]
    unnamed = registered.class_names == placeholders and sorted(found.class_names) != sorted(placeholders)
    differ = [
        f"{field} {getattr(found, field)} (registered: {getattr(registered, field)})"
        for field in AGREEING_FIELDS
        if not (field == "class_names" and unnamed) and not _same(getattr(found, field), getattr(registered, field))
    ]
    if differ:
        raise CheckpointError("the checkpoint's manifest disagrees with the model's registration: " + "; ".join(differ))


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        # mean/std typed by hand to three or four decimals are the same normalisation
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, abs_tol=1e-3)
    return a == b


def check_finite(state: dict[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name!r} holds NaN or Inf")


def load_checkpoint_bytes(
    data: bytes, expected: Manifest | None = None, max_parameters: int | None = None, *, agree: bool = False
) -> tuple[torch.nn.Module, Manifest]:
    """Parse, check and build the model. Given `expected` (a registered model), it is built as
    that says; with `agree` (an upload), a manifest the file carries must agree with it too."""
    header = parse_header(data, max_parameters)
    manifest = expected or read_manifest(header)
    try:
        validate_header(header, model_skeleton(manifest.architecture, manifest.in_channels, manifest.num_classes))
        model = build_model(manifest.architecture, manifest.in_channels, manifest.num_classes)
    except UisError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        state = st_load(data)
    except Exception as exc:  # safetensors raises its own error types on malformed content
        raise CheckpointError(f"cannot parse safetensors: {exc}") from None
    check_finite(state)
    if agree and expected is not None:
        check_manifest_agrees(header, expected)
    try:
        model.load_state_dict(_with_module_versions(state, model))
    except (RuntimeError, ValueError) as exc:  # the header matched the skeleton: this is a model's own check
        raise CheckpointError(f"the tensors do not load into {manifest.architecture}: {exc}"[:1000]) from None
    return model.eval(), manifest


def _with_module_versions(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with the module versions a state_dict carries beside its tensors (`_metadata`),
    which safetensors does not keep: some modules' loaders read them (torchvision's MNASNet
    refuses a state without its version), and these are the versions of the code that built
    `model`, the layout the header was checked against."""
    versions = getattr(model.state_dict(), "_metadata", None)
    if versions is None:
        return state
    with_versions = OrderedDict(state)
    with_versions._metadata = versions  # type: ignore[attr-defined]
    return with_versions


def load_checkpoint(path: Path, max_bytes: int = 2 << 30) -> tuple[torch.nn.Module, Manifest]:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if size > max_bytes:
        raise CheckpointError(f"checkpoint is {size} bytes, over the {max_bytes}-byte limit")
    return load_checkpoint_bytes(path.read_bytes())
