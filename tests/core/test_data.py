"""Data specs: digits, npz (colour and grayscale), clear errors for the rest."""

import io
import pickle
import re
import tracemalloc
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import load_dataset, validation_split
from core.errors import DataError, InvalidLabels
from core.validation import check_labels


def test_digits_is_a_stratified_uint8_split():
    ds = load_dataset("digits")
    assert ds.train.x.dtype.is_floating_point is False and ds.input_shape == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797 and ds.num_classes == 10


@pytest.mark.parametrize("shape, channels", [((20, 6, 6, 3), 3), ((20, 6, 6), 1)])
def test_npz_reads_colour_and_grayscale_images(tmp_path, shape, channels):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 255, shape, dtype=np.uint8), y_train=np.arange(20) % 4,
             x_test=rng.integers(0, 255, shape, dtype=np.uint8), y_test=np.arange(20) % 4,
             classes=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(f"npz:{path}")
    assert ds.input_shape == (channels, 6, 6) and ds.classes == ["a", "b", "c", "d"]


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x_train=np.array([object()], dtype=object))
    with pytest.raises(DataError):
        load_dataset(f"npz:{path}")


class _WritesAMarker:
    """Unpickling this runs code: it writes the file it names (what a hostile pickle could do)."""

    def __init__(self, marker):  # noqa: ANN001
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_a_cifar_root_of_other_bytes_is_refused_unloaded(tmp_path, kind, folder):
    """cifar10/cifar100 batches are pickles: a tenant's folder holding its own files under their
    names must fail the job, not run them (torchvision checks the official md5s before it loads)."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    root, marker = tmp_path / "data", tmp_path / "ran"
    (root / folder).mkdir(parents=True)
    for name, _ in cls.train_list + cls.test_list + [(cls.meta["filename"], None)]:
        (root / folder / name).write_bytes(pickle.dumps(_WritesAMarker(marker)))

    with pytest.raises(DataError, match="not found"):
        load_dataset(f"{kind}:{root}")
    assert not marker.exists()
    assert b"touch" in (root / folder / cls.train_list[0][0]).read_bytes()  # what loading it would have called


def _npz(path, x_train, y_train, x_test, y_test, classes=("a", "b")):  # noqa: ANN001, ANN202
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(classes))
    return f"npz:{path}"


def test_npz_files_that_cannot_make_a_dataset_are_clear_errors(tmp_path):
    images, labels, larger = np.zeros((4, 6, 6), np.uint8), np.array([0, 1, 0, 1]), np.zeros((4, 7, 7), np.uint8)
    np.save(tmp_path / "one.npy", images)
    cases = {
        "a single .npy array": "npz:" + str(tmp_path / "one.npy"),
        "at least one image": _npz(tmp_path / "empty.npz", images[:0], labels[:0], images, labels),
        "x_test images are (1, 7, 7)": _npz(tmp_path / "sizes.npz", images, labels, larger, labels),
        "labels from 0 to 2": _npz(tmp_path / "many.npz", images, labels, images, np.array([0, 1, 2, 1])),
        "labels from -1 to 1": _npz(tmp_path / "negative.npz", images, np.array([-1, 1, 0, 1]), images, labels),
    }
    whole = Path(_npz(tmp_path / "whole.npz", images, labels, images, labels)[4:]).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    (tmp_path / "damaged.npz").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip's signature, no zip
    central = whole.find(b"PK\x01\x02")  # the first member's central directory entry; +10: its compression
    (tmp_path / "method.npz").write_bytes(whole[:central + 10] + (99).to_bytes(2, "little") + whole[central + 12:])
    cases |= {"cannot read " + str(tmp_path / name): "npz:" + str(tmp_path / name)
              for name in ("cut.npz", "damaged.npz", "method.npz")}
    for message, spec in cases.items():
        with pytest.raises(DataError, match=re.escape(message)):
            load_dataset(spec)


@pytest.mark.parametrize("spec", ["nope", "npz:/does/not/exist.npz", "cifar10:/does/not/exist"])
def test_unknown_or_missing_sources_are_clear_errors(spec):
    with pytest.raises(DataError):
        load_dataset(spec)


@pytest.mark.parametrize(
    "labels, earlier, message",
    [([10], [], "out of range"), ([-1], [], "out of range"), ([2, 2], [], "duplicate"),
     ([1], [1], "already forgotten"), (list(range(9)), [9], "every class"), ([], [], "no labels")],
)
def test_bad_forget_labels_are_refused(labels, earlier, message):
    with pytest.raises(InvalidLabels, match=message):
        check_labels(labels, 10, earlier)


def test_imagefolder_reads_train_and_test_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (6, 5), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.classes == ["cat", "dog"] and ds.input_shape == (3, 5, 6)
    assert len(ds.train) == 6 and ds.train.y.tolist().count(1) == 3


@pytest.mark.parametrize("damage, message", [
    ("a class folder without images", "Found no valid file for the classes dog"),
    ("a file that is not an image", "cannot read {bad} as an image"),
    ("an image cut short", "cannot read {bad} as an image"),
])
def test_imagefolder_files_that_cannot_make_a_dataset_are_clear_errors(tmp_path, damage, message):
    _classes_of_images(tmp_path, (6, 5))
    bad = tmp_path / "train" / "dog" / "0.png"
    if damage == "a class folder without images":
        bad.unlink()
    elif damage == "a file that is not an image":
        bad.write_bytes(b"not a picture")
    else:
        bad.write_bytes(bad.read_bytes()[:40])

    with pytest.raises(DataError, match=re.escape(message.format(bad=bad))):
        load_dataset(f"imagefolder:{tmp_path}")


def test_the_shared_cifar10_subset_loads_as_colour_images():
    import os
    from pathlib import Path

    path = Path(os.environ.get("UISPS_CIFAR10_SUBSET", Path(__file__).parents[3] / "shared/data/cifar10_subset.npz"))
    if not path.exists():
        pytest.skip(f"the CIFAR-10 subset is not on this machine ({path}; set UISPS_CIFAR10_SUBSET)")
    ds = load_dataset(f"npz:{path}")
    assert (len(ds.train), len(ds.test), ds.input_shape) == (5085, 1017, (3, 32, 32))
    assert ds.classes[0] == "airplane" and ds.flip


def _mnist_raw_files(root: Path, data: bytes) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(data)


def _classes_of_images(root: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", size).save(root / split / cls / "0.png")


def test_a_small_npz_that_decodes_past_the_limit_is_refused_before_decoding(tmp_path):
    # 61 MB of zeros compress to about 60 KB: the header says how much they decode to
    path = tmp_path / "bomb.npz"
    x = np.zeros((20_000, 32, 32, 3), np.uint8)
    np.savez_compressed(path, x_train=x, y_train=np.zeros(20_000, np.int64), x_test=x[:10], y_test=np.zeros(10, np.int64))
    assert path.stat().st_size < 1_000_000

    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"decode to 0\.06 GiB, over this service's limit of 0\.01 GiB"):
            load_dataset(f"npz:{path}", max_bytes=10 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20  # x_train (61 MB) was never decoded
    assert len(load_dataset(f"npz:{path}", max_bytes=100 * 2**20).train) == 20_000


def test_imagefolder_images_past_the_limit_are_refused_before_decoding(tmp_path):
    _classes_of_images(tmp_path, (400, 300))  # 360,000 bytes each as RGB, four of them

    with pytest.raises(DataError, match="UISPS_MAX_DATASET_BYTES"):
        load_dataset(f"imagefolder:{tmp_path}", max_bytes=1_000_000)
    assert len(load_dataset(f"imagefolder:{tmp_path}", max_bytes=2_000_000).train) == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_of_more_pixels_than_pillow_allows_is_refused(tmp_path, monkeypatch):
    # between Pillow's limit and twice it, Pillow only warns and decodes
    from PIL import Image

    _classes_of_images(tmp_path, (20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    with pytest.raises(DataError, match="is 20x20 pixels, more than an image may have here"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_an_mnist_root_with_torchvision_s_pickled_files_is_refused_unread(tmp_path):
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(pickle.dumps({"not": "read"}))

    with pytest.raises(DataError, match="legacy MNIST/processed/\\*.pt files, which are pickles"):
        load_dataset(f"mnist:{tmp_path}")


def test_malformed_mnist_raw_files_are_bad_data(tmp_path):
    _mnist_raw_files(tmp_path, b"\x00\x00\x08\x03" + bytes(7))  # a header cut short

    with pytest.raises(DataError, match="cannot read mnist under"):
        load_dataset(f"mnist:{tmp_path}")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _archive(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return f"npz:{path}"


def _arrays(n: int = 4) -> dict[str, np.ndarray]:
    return {"x_train": np.zeros((n, 6, 6), np.uint8), "y_train": np.arange(n) % 2,
            "x_test": np.zeros((n, 6, 6), np.uint8), "y_test": np.arange(n) % 2}


def test_npz_members_named_without_npy_load_as_before(tmp_path):
    spec = _archive(tmp_path / "bare.npz", {name: _npy(a) for name, a in _arrays().items()})
    assert len(load_dataset(spec).train) == 4


def test_an_npz_with_two_members_for_one_array_is_refused(tmp_path):
    # numpy reads the bare one; a size check of the other would let a bomb through
    members = {f"{name}.npy": _npy(a) for name, a in _arrays().items()}
    members["x_train"] = _npy(np.zeros((20_000, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="holds both x_train.npy and x_train"):
        load_dataset(_archive(tmp_path / "twice.npz", members), max_bytes=10 * 2**20)


def test_an_npz_array_of_negative_size_cannot_hide_the_others(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (-10**9,)})
    members = {f"{name}.npy": _npy(a) for name, a in _arrays().items()}
    members["classes.npy"] = header.getvalue()
    with pytest.raises(DataError, match=r"classes has the shape \(-1000000000,\)"):
        load_dataset(_archive(tmp_path / "negative.npz", members), max_bytes=10 * 2**20)


@pytest.mark.parametrize("kind", ["npz", "imagefolder", "mnist", "cifar10"])
def test_a_path_the_file_system_refuses_is_bad_data(kind):
    with pytest.raises(DataError):
        load_dataset(f"{kind}:/tmp/{'a' * 300}")


def test_mnist_raw_files_past_the_limit_are_refused_unread(tmp_path):
    _mnist_raw_files(tmp_path, bytes(1000))

    with pytest.raises(DataError, match="UISPS_MAX_DATASET_BYTES"):
        load_dataset(f"mnist:{tmp_path}", max_bytes=3000)


def test_a_validation_split_holds_out_a_fraction_of_each_class_from_training():
    digits = load_dataset("digits")

    held = validation_split(digits, 0.2)

    assert torch.equal(held.test.x, validation_split(digits, 0.2).test.x)  # the same images each time
    assert not torch.equal(held.test.x, validation_split(digits, 0.2, seed=1).test.x)
    assert len(held.train) + len(held.test) == len(digits.train)
    for label in range(10):
        n = int((digits.train.y == label).sum())
        assert int((held.test.y == label).sum()) == round(0.2 * n)
    # a partition: together the two hold each training image (and label) exactly once

    def samples(*splits):
        return sorted(bytes(x.numpy()) + bytes([int(y)]) for split in splits for x, y in zip(split.x, split.y))

    assert samples(held.train, held.test) == samples(digits.train)
    assert held.spec == "digits#validation=0.2,seed=0" and held.classes == digits.classes


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_validation_fraction_outside_0_to_1_is_refused(fraction):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validation_split(load_dataset("digits"), fraction)


def test_a_validation_split_that_would_take_a_whole_class_is_refused():
    digits = load_dataset("digits")
    first_seven = int((digits.train.y == 7).nonzero()[0])
    keep = (digits.train.y != 7) | (torch.arange(len(digits.train)) == first_seven)
    one_seven = replace(digits, train=digits.train.select(keep))  # one training image of class 7

    with pytest.raises(ValueError, match=r"none of class\(es\) \[7\]"):
        validation_split(one_seven, 0.2)
