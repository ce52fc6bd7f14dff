"""Input checks that need no torch, so the API process can run them without loading it."""

from __future__ import annotations

from collections.abc import Iterable

from core.errors import ArchitectureError, DataError, InvalidLabels

OWN_ARCHITECTURES = ("resnet18", "allcnn", "smallcnn")
DATA_KINDS_WITH_PATH = ("npz", "cifar10", "cifar100", "svhn", "mnist", "imagefolder")


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
