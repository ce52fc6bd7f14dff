"""Where a model's data may lie, and whether the model can take it: core.validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.data import load_dataset
from core.errors import DataError
from core.validation import FIXED_DATA_SHAPES, check_data_fits, check_data_location


def test_a_path_under_a_root_is_accepted(tmp_path: Path) -> None:
    check_data_location(f"npz:{tmp_path / 'sub' / 'train.npz'}", [str(tmp_path)], "acme")
    check_data_location(f"cifar10:{tmp_path}", [str(tmp_path)], "acme")


def test_digits_needs_no_root() -> None:
    check_data_location("digits", [], "acme")


def test_without_roots_no_file_may_be_read(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="UISPS_DATA_ROOTS"):
        check_data_location(f"npz:{tmp_path / 'x.npz'}", [], "acme")


@pytest.mark.parametrize("path", ["/etc/passwd", "{root}/../outside.npz", "{root}-sibling/x.npz"])
def test_a_path_outside_every_root_is_refused(tmp_path: Path, path: str) -> None:
    root = tmp_path / "data"
    with pytest.raises(DataError, match="outside the folders"):
        check_data_location("npz:" + path.format(root=root), [str(root)], "acme")


def test_a_symbolic_link_out_of_a_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    with pytest.raises(DataError, match="outside the folders"):
        check_data_location(f"imagefolder:{root / 'escape'}", [str(root)], "acme")


@pytest.mark.parametrize("path", ["train.npz", "~/train.npz", "data/../train.npz"])
def test_relative_paths_are_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(DataError, match="absolute"):
        check_data_location(f"npz:{path}", [str(tmp_path)], "acme")


def test_a_tenant_root_admits_only_that_tenants_folder(tmp_path: Path) -> None:
    roots = [str(tmp_path / "{tenant}")]
    check_data_location(f"npz:{tmp_path / 'acme' / 'x.npz'}", roots, "acme")
    with pytest.raises(DataError, match="outside the folders"):
        check_data_location(f"npz:{tmp_path / 'globex' / 'x.npz'}", roots, "acme")


def test_a_link_inside_a_folder_source_must_stay_inside_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "data" / "acme"
    (root / "faces" / "train").mkdir(parents=True)
    (tmp_path / "data" / "globex").mkdir()
    (root / "faces" / "inside").symlink_to(root / "faces" / "train")
    check_data_location(f"imagefolder:{root / 'faces'}", [str(tmp_path / "data" / "{tenant}")], "acme")

    (root / "faces" / "train" / "cat").symlink_to(tmp_path / "data" / "globex")
    with pytest.raises(DataError, match="outside the folders"):
        check_data_location(f"imagefolder:{root / 'faces'}", [str(tmp_path / "data" / "{tenant}")], "acme")


def test_a_link_reached_through_another_link_is_checked_too(tmp_path: Path) -> None:
    root = tmp_path / "data" / "acme"
    (root / "faces" / "train").mkdir(parents=True)
    (root / "other").mkdir()
    (tmp_path / "data" / "globex" / "secret").mkdir(parents=True)
    (root / "faces" / "train" / "cat").symlink_to(root / "other")  # inside the roots
    (root / "other" / "loop").symlink_to(root / "faces")  # a cycle must not hang the walk
    check_data_location(f"imagefolder:{root / 'faces'}", [str(tmp_path / "data" / "{tenant}")], "acme")

    (root / "other" / "leak").symlink_to(tmp_path / "data" / "globex" / "secret")  # reached only through cat
    with pytest.raises(DataError, match="outside the folders"):
        check_data_location(f"imagefolder:{root / 'faces'}", [str(tmp_path / "data" / "{tenant}")], "acme")


def test_the_fixed_shape_of_digits_is_what_its_loader_gives() -> None:
    digits = load_dataset("digits")

    assert FIXED_DATA_SHAPES["digits"] == (digits.input_shape, digits.num_classes)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: a magic number naming the element type (ubyte) and rank, then each size."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_the_fixed_shape_of_mnist_is_what_its_loader_gives(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"  # where torchvision looks for the files under a root
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)

    mnist = load_dataset(f"mnist:{tmp_path}")

    assert FIXED_DATA_SHAPES["mnist"] == (mnist.input_shape, mnist.num_classes)


@pytest.mark.parametrize(
    ("spec", "shape", "classes", "fits"),
    [
        ("digits", [1, 8, 8], 10, True),
        ("digits", [1, 8, 8], 5, False),
        ("cifar10:/data/cifar", [3, 32, 32], 10, True),
        ("cifar10:/data/cifar", [1, 28, 28], 10, False),
        ("cifar100:/data/cifar", [3, 32, 32], 10, False),
        ("npz:/data/x.npz", [3, 224, 224], 7, True),  # what a file holds is known only by reading it
        ("imagefolder:/data/pets", [3, 224, 224], 37, True),
        ("imagefolder:/data/pets", [1, 224, 224], 37, False),  # read as RGB
    ],
)
def test_a_source_of_fixed_shape_must_fit_the_model(spec: str, shape: list[int], classes: int, fits: bool) -> None:
    if fits:
        check_data_fits(spec, shape, classes)
    else:
        with pytest.raises(DataError, match="this model is registered for"):
            check_data_fits(spec, shape, classes)
