"""The jobs the CLI and the worker run: train a model, unlearn labels from one, evaluate one."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from core.architectures import seeded_model, validate_arch_name
from core.checkpoint import Manifest
from core.config import TrainConfig, UnlearnConfig
from core.data import Dataset, retained_data
from core.device import Normalizer
from core.errors import DataError
from core.metrics import MIA_DEFINITION, Evaluation, evaluate
from core.progress import ProgressFn, no_progress
from core.training import train
from core.uisps import run_uisps
from core.validation import check_labels


def train_model(
    dataset: Dataset,
    arch: str,
    config: TrainConfig,
    device: torch.device,
    exclude: list[int] = (),  # type: ignore[assignment]
    progress: ProgressFn = no_progress,
) -> tuple[nn.Module, Manifest]:
    """Train `arch` on `dataset`; `exclude` leaves labels out (the Retrain reference)."""
    validate_arch_name(arch)
    if exclude:
        check_labels(exclude, dataset.num_classes)
    c = dataset.input_shape[0]
    mean, std = dataset.channel_stats()
    model = seeded_model(arch, c, dataset.num_classes, config.seed)
    data = dataset.train.without_labels(exclude) if exclude else dataset.train
    train(model, data, Normalizer(mean, std, device), config, dataset.flip, progress)
    manifest = Manifest(
        architecture=arch, in_channels=c, num_classes=dataset.num_classes,
        input_shape=list(dataset.input_shape), class_names=dataset.classes, mean=mean, std=std,
        forgotten_labels=sorted(exclude), data_source=dataset.spec,
    )
    return model, manifest


def check_fit(manifest: Manifest, dataset: Dataset) -> None:
    if list(dataset.input_shape) != manifest.input_shape or dataset.num_classes != manifest.num_classes:
        raise DataError(
            f"data {dataset.spec!r} has inputs {list(dataset.input_shape)} and {dataset.num_classes} classes; "
            f"the model expects {manifest.input_shape} and {manifest.num_classes}"
        )


def evaluate_model(
    model: nn.Module, manifest: Manifest, dataset: Dataset, forget: list[int], device: torch.device
) -> Evaluation:
    check_fit(manifest, dataset)
    forget = check_labels(forget, manifest.num_classes) if forget else []
    earlier = [lab for lab in manifest.forgotten_labels if lab not in forget]
    return evaluate(model.to(device), dataset, forget, manifest.mean, manifest.std, device, earlier)


@dataclass
class UnlearnResult:
    model: nn.Module
    manifest: Manifest
    report: dict


def unlearn_model(
    model: nn.Module,
    manifest: Manifest,
    dataset: Dataset,
    forget: list[int],
    config: UnlearnConfig,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> UnlearnResult:
    """Forget `forget` on top of what `manifest` already forgot, and measure before and after."""
    check_fit(manifest, dataset)
    forget = check_labels(forget, manifest.num_classes, manifest.forgotten_labels)
    all_forgotten = sorted(set(manifest.forgotten_labels) | set(forget))
    model.to(device)
    progress("evaluation", 0, 2)
    before = evaluate_model(model, manifest, dataset, forget, device)
    retained = retained_data(dataset, all_forgotten)
    outcome = run_uisps(model, manifest.architecture, retained, forget, manifest.mean, manifest.std, config, device, progress)
    start = time.perf_counter()
    progress("evaluation", 1, 2)
    after = evaluate_model(outcome.model, manifest, dataset, forget, device)
    outcome.timings["evaluation"] = time.perf_counter() - start
    progress("evaluation", 2, 2)
    new_manifest = manifest.model_copy(update={"forgotten_labels": all_forgotten})
    report = {
        "forget_labels": forget,
        "previously_forgotten": sorted(manifest.forgotten_labels),
        "method": "uisps",
        "before": before.as_dict(),
        "after": after.as_dict(),
        "timings": outcome.timings,
        "frozen_fraction": outcome.frozen_fraction,
        "dampened_fraction": outcome.dampened_fraction,
        "head_reset": outcome.head_reset,
        "blocks_reset": outcome.blocks_reset,
        "steps": outcome.steps,
        "epochs_equivalent": outcome.epochs_equivalent,
        "retained_train_samples": len(retained.train),
        "inversion_losses": outcome.inversion_losses,
        "config": config.model_dump(),
        "device": str(device),
        "mia_definition": MIA_DEFINITION,
        "splits": "accuracies on the test split; MIA on the forgotten classes' training split",
    }
    return UnlearnResult(outcome.model, new_manifest, report)
