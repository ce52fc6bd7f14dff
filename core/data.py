"""Data sources named by a spec string, loaded as uint8 image tensors (N, C, H, W).

Specs: `digits`, `npz:<path>`, `cifar10:<root>`, `cifar100:<root>`, `svhn:<root>`, `mnist:<root>`,
`imagefolder:<root>` (with `train/` and `test/` class folders). Nothing is downloaded: the
torchvision loaders read a local root only.
"""

from __future__ import annotations

import errno
import math
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch

from core.errors import DataError

GIB = 1024**3


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def select(self, mask: torch.Tensor) -> Split:
        return Split(self.x[mask], self.y[mask])

    def with_labels(self, labels: Iterable[int]) -> Split:
        return self.select(torch.isin(self.y, torch.tensor(sorted(labels), dtype=torch.long)))

    def without_labels(self, labels: Iterable[int]) -> Split:
        return self.select(~torch.isin(self.y, torch.tensor(sorted(labels), dtype=torch.long)))


@dataclass(frozen=True)
class Dataset:
    spec: str
    train: Split
    test: Split
    classes: list[str]
    flip: bool  # horizontal flips are a fair augmentation for natural images, not for digits

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training split, on the 0..1 scale."""
        x = self.train.x.float().div_(255)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()


@dataclass(frozen=True)
class RetainedData:
    """The only training data an unlearning method may see: no sample of a forgotten label.

    Built by `retained_data`, which drops every forgotten label, so a zero-glance method cannot be
    handed a forgotten sample by mistake.
    """

    train: Split
    forgotten: frozenset[int]
    num_classes: int
    flip: bool
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.forgotten and torch.isin(self.train.y, torch.tensor(sorted(self.forgotten))).any():
            raise AssertionError("retained data holds a forgotten label")


def retained_data(dataset: Dataset, forgotten: Iterable[int]) -> RetainedData:
    forgotten = frozenset(forgotten)
    return RetainedData(
        train=dataset.train.without_labels(forgotten),
        forgotten=forgotten,
        num_classes=dataset.num_classes,
        flip=dataset.flip,
        classes=dataset.classes,
    )


def stratified_sample(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of `fraction` of each label's samples (at least one each), chosen by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for label in y.unique():
        idx = (y == label).nonzero().flatten()
        keep = max(1, round(fraction * len(idx)))
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:keep]])
    return torch.cat(picks).sort().values


def validation_split(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """The dataset with `fraction` of each class's training images held out as its test split.

    For choosing settings without reading the test split: models train on the rest and are
    scored on the held-out images. The real test split is not part of the result at all.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"a validation fraction lies strictly between 0 and 1, not {fraction}")
    held = torch.zeros(len(dataset.train), dtype=torch.bool)
    held[stratified_sample(dataset.train.y, fraction, seed)] = True
    kept = dataset.train.y[~held].unique().tolist()
    if gone := sorted(set(dataset.train.y.unique().tolist()) - set(kept)):
        raise ValueError(f"holding out {fraction:g} of the training images leaves none of class(es) {gone} to train on")
    return Dataset(f"{dataset.spec}#validation={fraction:g},seed={seed}", dataset.train.select(~held),
                   dataset.train.select(held), dataset.classes, dataset.flip)


def _to_nchw(x: np.ndarray, name: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{name} must be uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{name} must be (N,H,W) or (N,H,W,C) images, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must be {n} integer labels, got shape {y.shape} dtype {y.dtype}")
    return torch.from_numpy(y.astype(np.int64))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.25, stratify=bunch.target, random_state=0
    )
    return Dataset(
        spec="digits",
        train=Split(_to_nchw(x_tr, "digits"), _labels(y_tr, len(x_tr), "digits")),
        test=Split(_to_nchw(x_te, "digits"), _labels(y_te, len(x_te), "digits")),
        classes=[str(i) for i in range(10)],
        flip=False,
    )


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# Read errors of the disk, the network file system or the machine, not of the data: the job is
# retried. Any other (a name too long, not there, not a folder, not readable, a seek past the end
# of a cut file) is the data's fault: `invalid_data`, at once.
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ENOMEM,
                     errno.ENFILE, errno.EMFILE}


def _data_fault(exc: OSError) -> bool:
    return exc.errno not in _TRANSIENT_ERRNOS


def _npz_members(archive: zipfile.ZipFile, path: Path) -> dict[str, str]:
    """The member each array is read from: `x_train.npy` as np.savez names it, or a bare `x_train`."""
    names = set(archive.namelist())
    members = {}
    for name in (*_NPZ_ARRAYS, "classes"):
        found = [member for member in (f"{name}.npy", name) if member in names]
        if len(found) > 1:
            raise DataError(f"{path} holds both {name}.npy and {name}; keep one")
        if found:
            members[name] = found[0]
    return members


def _npy_bytes(member: IO[bytes], path: Path, name: str) -> int:
    """Bytes an array decodes to, from its .npy header alone: a few kilobytes of a compressed
    archive may decode to gigabytes, so the size is known before the array is read."""
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        raise DataError(f"{path}: {name} is a .npy file of version {version}; save it with numpy's np.savez")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(member)
    if any(dim < 0 for dim in shape):  # numpy reads one; a negative size would hide the others'
        raise DataError(f"{path}: {name} has the shape {shape}")
    if dtype.hasobject:
        raise DataError(f"{path}: {name} holds Python objects, which this service never unpickles")
    return math.prod(shape) * dtype.itemsize


def _check_size(total: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and total > max_bytes:
        raise DataError(f"{what} decode to {total / GIB:.2f} GiB, over this service's limit of "
                        f"{max_bytes / GIB:.2f} GiB a data set (UISPS_MAX_DATASET_BYTES)")


def _read_npz(path: Path, max_bytes: int | None) -> dict[str, np.ndarray]:
    """The arrays the loader uses, each read from the member whose header was sized (no other
    member is read: one that is not a .npy would be read whole, as bytes)."""
    with zipfile.ZipFile(path) as archive:
        members = _npz_members(archive, path)
        sizes = {}
        for name, member in members.items():
            with archive.open(member) as fp:
                sizes[name] = _npy_bytes(fp, path, name)
        _check_size(sum(sizes.values()), max_bytes, f"the arrays of {path}")
        arrays = {}
        for name, member in members.items():
            with archive.open(member) as fp:
                arrays[name] = np.lib.format.read_array(fp, allow_pickle=False)
        return arrays


def _npz(spec: str, path: Path, max_bytes: int | None = None) -> Dataset:
    try:
        with path.open("rb") as head:
            if head.read(6) == b"\x93NUMPY":
                raise DataError(f"{path} is a single .npy array, not an .npz archive of arrays")
        arrays = _read_npz(path, max_bytes)
    except OSError as exc:
        if not _data_fault(exc):
            raise
        if exc.errno == errno.ENOENT:
            raise DataError(f"data file not found: {path}") from None
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    # a damaged or truncated archive (NotImplementedError: zipfile, for a compression it lacks)
    except (ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    missing = set(_NPZ_ARRAYS) - arrays.keys()
    if missing:
        raise DataError(f"{path} lacks arrays {sorted(missing)}")
    x_train, x_test = _to_nchw(arrays["x_train"], "x_train"), _to_nchw(arrays["x_test"], "x_test")
    if not len(x_train) or not len(x_test):
        raise DataError(f"{path}: x_train and x_test must each hold at least one image")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_test images are {tuple(x_test.shape[1:])} (C,H,W), x_train images {tuple(x_train.shape[1:])}"
        )
    train = Split(x_train, _labels(arrays["y_train"], len(x_train), "y_train"))
    test = Split(x_test, _labels(arrays["y_test"], len(x_test), "y_test"))
    num = int(max(train.y.max(), test.y.max())) + 1
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(num)]
    for name, split in (("y_train", train), ("y_test", test)):
        if int(split.y.min()) < 0 or int(split.y.max()) >= len(classes):
            raise DataError(
                f"{path}: {name} holds labels from {int(split.y.min())} to {int(split.y.max())}; "
                f"with {len(classes)} classes they must be 0..{len(classes) - 1}"
            )
    return Dataset(spec, train, test, classes, flip=train.x.shape[1] == 3)


def _check_mnist_root(root: Path, max_bytes: int | None) -> None:
    """torchvision would torch.load (unpickle) legacy processed files instead of the raw ones, and
    reads raw files of any size (they are not checked against the release's md5s)."""
    from torchvision.datasets import MNIST

    if any((root / "MNIST" / "processed" / name).exists() for name in (MNIST.training_file, MNIST.test_file)):
        raise DataError(f"mnist root {root} holds torchvision's legacy MNIST/processed/*.pt files, which are "
                        "pickles this service does not read; remove MNIST/processed and keep MNIST/raw")
    raw = root / "MNIST" / "raw"
    files = [raw / Path(name).stem for name, _ in MNIST.resources]  # the files it reads, unpacked
    _check_size(sum(file.stat().st_size for file in files if file.is_file()), max_bytes, f"the raw files under {raw}")


def _torchvision_split(kind: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import torchvision.datasets as tvd

    try:
        if kind == "svhn":
            ds = tvd.SVHN(str(root), split="train" if train else "test", download=False)
            return ds.data, np.asarray(ds.labels), [str(i) for i in range(10)]
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[kind]
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as exc:  # torchvision says "Dataset not found or corrupted"
        raise DataError(f"{kind} not found under {root}: {exc}") from None
    except (ValueError, AssertionError, EOFError, IndexError, KeyError) as exc:  # malformed files
        raise DataError(f"cannot read {kind} under {root}: {type(exc).__name__}: {exc}") from None
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
    return data, np.asarray(ds.targets), list(ds.classes)


def _imagefolder(spec: str, root: Path, max_bytes: int | None = None) -> Dataset:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    decoded = 0  # bytes of the images decoded so far, both splits

    def rgb(path: str) -> np.ndarray:
        nonlocal decoded
        try:
            with Image.open(path) as image:  # reads the header: the size is known before decoding
                width, height = image.size
                if width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
                    raise DataError(f"{path} is {width}x{height} pixels, more than an image may have here")
                decoded += width * height * 3
                _check_size(decoded, max_bytes, f"the images under {root}")
                return np.asarray(image.convert("RGB"))
        except OSError as exc:  # not an image, a truncated one; or the disk's error, retried
            if not _data_fault(exc):
                raise
            raise DataError(f"cannot read {path} as an image: {exc}") from None
        # a bomb, or a decoder's own complaint
        except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read {path} as an image: {exc}") from None

    def load(sub: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if not (root / sub).is_dir():
            raise DataError(f"imagefolder needs {root / sub}/<class>/<image> folders")
        try:
            folder = ImageFolder(str(root / sub))
        except FileNotFoundError as exc:  # a class folder without images, or no class folder
            raise DataError(f"{root / sub}: {exc}") from None
        images = [rgb(path) for path, _ in folder.samples]
        if len({im.shape for im in images}) > 1:
            raise DataError(f"images under {root / sub} differ in size; resize them to one size first")
        return np.stack(images), np.asarray(folder.targets), folder.classes

    xtr, ytr, classes = load("train")
    xte, yte, classes_te = load("test")
    if classes != classes_te:
        raise DataError("train/ and test/ must hold the same class folders")
    return Dataset(
        spec,
        Split(_to_nchw(xtr, "train"), _labels(ytr, len(xtr), "train")),
        Split(_to_nchw(xte, "test"), _labels(yte, len(xte), "test")),
        classes,
        flip=True,
    )


def load_dataset(spec: str, max_bytes: int | None = None) -> Dataset:
    """The data set a spec names. `max_bytes`: refuse a source whose images would decode to more
    (npz and imagefolder from their headers, mnist from its raw files, before decoding; cifar and
    svhn files must be the official releases, of fixed sizes)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits()
    if not arg:
        raise DataError(f"unknown data spec {spec!r} (use digits, npz:<path>, cifar10:<root>, ...)")
    try:
        return _load_path(spec, kind, Path(arg).expanduser(), max_bytes)
    except OSError as exc:  # what the file system says of the tenant's path (too long, not there, ...)
        if not _data_fault(exc):
            raise
        raise DataError(f"cannot read {spec}: {exc}") from None


def _load_path(spec: str, kind: str, path: Path, max_bytes: int | None) -> Dataset:
    if kind == "npz":
        return _npz(spec, path, max_bytes)
    if kind == "imagefolder":
        return _imagefolder(spec, path, max_bytes)
    if kind in ("cifar10", "cifar100", "svhn", "mnist"):
        if kind == "mnist":
            _check_mnist_root(path, max_bytes)
        xtr, ytr, classes = _torchvision_split(kind, path, True)
        xte, yte, _ = _torchvision_split(kind, path, False)
        return Dataset(
            spec,
            Split(_to_nchw(xtr, kind), _labels(ytr, len(xtr), kind)),
            Split(_to_nchw(xte, kind), _labels(yte, len(xte), kind)),
            classes,
            flip=kind in ("cifar10", "cifar100"),
        )
    raise DataError(f"unknown data source kind {kind!r} in {spec!r}")
