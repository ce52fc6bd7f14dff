"""Input checks that need no torch, so the API process can run them without loading it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.errors import ArchitectureError, DataError, InvalidLabels

OWN_ARCHITECTURES = ("resnet18", "allcnn", "smallcnn")
DATA_KINDS_WITH_PATH = ("npz", "cifar10", "cifar100", "svhn", "mnist", "imagefolder")
TENANT_PLACEHOLDER = "{tenant}"


def check_labels(labels: Iterable[int], num_classes: int, already_forgotten: Iterable[int] = ()) -> list[int]:
    """Validate forget labels: in range, no duplicates, not forgotten before, not every class."""
    labels = list(labels)
    if not labels:
        raise InvalidLabels("no labels to forget were given")
    bad = [lab for lab in labels if not isinstance(lab, int) or lab < 0 or lab >= num_classes]
    if bad:
        raise InvalidLabels(f"labels {bad} are out of range: this model has classes 0..{num_classes - 1}")
    if len(set(labels)) != len(labels):
        raise InvalidLabels(f"duplicate labels in {labels}")
    again = sorted(set(labels) & set(already_forgotten))
    if again:
        raise InvalidLabels(f"labels {again} were already forgotten by the base version")
    if len(set(labels) | set(already_forgotten)) >= num_classes:
        raise InvalidLabels("forgetting every class would leave nothing to classify")
    return sorted(labels)


def validate_arch_name(arch: str) -> None:
    """Known names only; a `torchvision:<name>` is checked against torchvision when built."""
    if arch in OWN_ARCHITECTURES or arch.startswith("torchvision:") and arch.split(":", 1)[1]:
        return
    known = ", ".join([*OWN_ARCHITECTURES, "torchvision:<name>"])
    raise ArchitectureError(f"unknown architecture {arch!r} (known: {known})")


def validate_data_spec(spec: str) -> None:
    """The spec's form only; whether the files exist is for the machine that reads them."""
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        return
    if kind in DATA_KINDS_WITH_PATH and arg:
        return
    raise DataError(
        f"unknown data spec {spec!r} (use digits, or {', '.join(k + ':<path>' for k in DATA_KINDS_WITH_PATH)})"
    )


# What the sources of a fixed kind hold, known without reading them: (input shape, classes).
FIXED_DATA_SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "svhn": ((3, 32, 32), 10),
}


def check_data_fits(spec: str, input_shape: Sequence[int], num_classes: int) -> None:
    """A model must take its data source's images and classes, or none of its jobs could run (the
    job checks the data it loads: this catches, at registration, what is known without reading)."""
    kind = spec.partition(":")[0]
    if kind == "imagefolder" and input_shape[0] != 3:  # its images are read as RGB, whatever their size
        raise DataError(
            f"data source {spec!r} holds RGB images; this model is registered for {input_shape[0]} channels"
        )
    if kind not in FIXED_DATA_SHAPES:
        return  # npz and imagefolder hold what their files hold
    shape, classes = FIXED_DATA_SHAPES[kind]
    if tuple(input_shape) != shape or num_classes != classes:
        raise DataError(
            f"data source {spec!r} holds {classes} classes of {'x'.join(map(str, shape))} images; "
            f"this model is registered for {num_classes} classes of {'x'.join(map(str, input_shape))}"
        )


def check_data_location(spec: str, roots: Sequence[str], tenant_id: str, shown: str | None = None) -> str:
    """A data source's path must lie under one of the operator's data roots; the spec with its
    path resolved, to be read as checked (a link swapped in after the check is not followed).
    `shown`: the spec as the tenant named it, for the error (default `spec`).

    A tenant names the path and the worker reads it, so without this check any tenant could make
    a worker train on any file it can read (another tenant's data included) and learn from the
    job's error whether a path exists. `{tenant}` in a root stands for the tenant's id, which gives
    each tenant a folder of its own. Paths are resolved (`..`, symbolic links) before the check;
    relative and `~` paths are refused, since the API and each worker would read them differently.
    """
    kind, _, arg = spec.partition(":")
    if kind not in DATA_KINDS_WITH_PATH:
        return spec  # `digits` ships inside scikit-learn; validate_data_spec refuses unknown kinds
    if not roots:
        raise DataError(
            f"data source {spec!r} names a file, and this service reads none: the operator has set no "
            "data roots (UISPS_DATA_ROOTS); use digits, or ask for a data root"
        )
    if not Path(arg).is_absolute():
        raise DataError(f"data source {spec!r}: the path must be absolute")
    target = Path(os.path.realpath(arg))
    named = [root.replace(TENANT_PLACEHOLDER, tenant_id) for root in roots]
    allowed = [Path(os.path.realpath(root)) for root in named]
    if not _within(target, allowed) or _link_out_of(target, allowed):
        # the roots as the operator named them: where they resolve to is the server's business
        raise DataError(
            f"data source {shown or spec!r} lies outside the folders this service reads data from: " + ", ".join(named)
        )
    return f"{kind}:{target}"


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _link_out_of(folder: Path, roots: Sequence[Path]) -> bool:
    """Whether a symbolic link reachable inside a folder data source (cifar10:, imagefolder:, ...)
    leads out of the roots. The loaders follow links, into linked folders too, so the walk does
    the same (each real folder once: link cycles end). Nothing where the folder is not visible
    (the API may not mount the data; the worker checks again before it reads)."""
    try:
        if not folder.is_dir():
            return False
    except OSError:  # a name the file system refuses (too long): the loader fails on it with a clear error
        return False
    seen: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            info = current.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_symlink() and not _within(Path(os.path.realpath(entry.path)), roots):
                        return True
                    if entry.is_dir(follow_symlinks=True):
                        pending.append(Path(entry.path))
        except OSError:  # unreadable here: the loader cannot read it either
            continue
    return False
