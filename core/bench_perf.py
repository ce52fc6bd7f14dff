"""`uisps bench perf`: UISPS stage times against a Retrain with the same training loop, one run.

Data: synthetic uint8 tensors of the real size by default (CIFAR-10: 45,000 retained training
images of 3x32x32, 10,000 test images), or a real data spec. Timing does not depend on what the
weights know, so the model is freshly initialised. Every stage runs once untimed first (cuDNN
autotuning, allocator warm-up), then timed; the Retrain is timed over a few epochs and scaled to
the paper's 50 (its epochs are identical in cost), which the output says.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch

from core.architectures import build_model
from core.config import InversionConfig, TrainConfig, UnlearnConfig
from core.data import Dataset, Split, load_dataset, retained_data
from core.device import Normalizer, use_bf16
from core.metrics import evaluate
from core.training import train
from core.uisps import run_uisps


@dataclass
class PerfSetup:
    arch: str = "resnet18"
    data: str = "synthetic"  # or a data spec such as npz:path
    forget: tuple[int, ...] = (0,)
    retrain_epochs_timed: int = 2
    retrain_epochs_paper: int = 50
    precision: str = "auto"
    channels_last: bool = True


def synthetic_cifar10(seed: int = 0) -> Dataset:
    """50,000 train / 10,000 test random images with CIFAR-10's shapes and class balance."""
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=gen)
    x_test = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y_train, y_test = torch.arange(50_000) % 10, torch.arange(10_000) % 10
    return Dataset("synthetic:cifar10", Split(x_train, y_train), Split(x_test, y_test),
                   [str(i) for i in range(10)], flip=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_perf(setup: PerfSetup, cfg: UnlearnConfig, device: torch.device) -> dict:
    cfg = cfg.model_copy(update={"precision": setup.precision})  # UISPS and Retrain alike
    dataset = synthetic_cifar10() if setup.data == "synthetic" else load_dataset(setup.data)
    mean, std = dataset.channel_stats()
    forget = list(setup.forget)
    retained = retained_data(dataset, forget)
    c = dataset.input_shape[0]
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(setup.arch, c, dataset.num_classes).to(device, memory_format=fmt)

    # untimed warm-up of every code path with tiny lengths
    warm = cfg.model_copy(update={"inversion": cfg.inversion.model_copy(update={"iterations": 3}), "steps": 3})
    run_uisps(fresh_model(), setup.arch, retained, forget, mean, std, warm, device)
    train_cfg = TrainConfig(epochs=1, precision=setup.precision)
    warm_split = Split(retained.train.x[:512], retained.train.y[:512])
    train(fresh_model(), warm_split, Normalizer(mean, std, device), train_cfg, dataset.flip)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = fresh_model()
    _sync(device)
    start = time.perf_counter()
    outcome = run_uisps(model, setup.arch, retained, forget, mean, std, cfg, device)
    eval_start = time.perf_counter()
    evaluate(model, dataset, forget, mean, std, device)
    _sync(device)
    end = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stages = dict(outcome.timings, evaluation=end - eval_start)

    retrain_cfg = TrainConfig(epochs=setup.retrain_epochs_timed, precision=setup.precision)
    retrain_model = fresh_model()
    _sync(device)
    r_start = time.perf_counter()
    train(retrain_model, retained.train, Normalizer(mean, std, device), retrain_cfg, dataset.flip)
    _sync(device)
    per_epoch = (time.perf_counter() - r_start) / setup.retrain_epochs_timed
    retrain_seconds = per_epoch * setup.retrain_epochs_paper
    uisps_seconds = end - start
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "setup": asdict(setup),
        "bf16": use_bf16(setup.precision, device),
        "retained_train_samples": len(retained.train),
        "unlearning_steps": outcome.steps,
        "stages": stages,
        "uisps_seconds": uisps_seconds,
        "retrain_seconds": retrain_seconds,
        "retrain_seconds_per_epoch": per_epoch,
        "retrain_note": f"{setup.retrain_epochs_timed} epochs timed, scaled to {setup.retrain_epochs_paper}",
        "ratio": uisps_seconds / retrain_seconds,
        "peak_memory_bytes": peak,
        "config": cfg.model_dump(),
    }


def markdown(result: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in result["stages"].items())
    peak = result["peak_memory_bytes"]
    peak_text = f"{peak / 2**30:.2f} GiB" if peak else "n/a (CPU)"
    return (
        f"# UISPS speed on {result['device']}\n\n"
        f"torch {result['torch']}, bf16 autocast: {result['bf16']}, data: {result['setup']['data']}, "
        f"{result['retained_train_samples']} retained images, {result['unlearning_steps']} unlearning steps.\n\n"
        f"| stage | seconds |\n| --- | --- |\n{rows}\n\n"
        f"- UISPS total: **{result['uisps_seconds']:.2f} s**\n"
        f"- Retrain ({result['retrain_note']}): **{result['retrain_seconds']:.1f} s** "
        f"({result['retrain_seconds_per_epoch']:.2f} s/epoch)\n"
        f"- ratio UISPS / Retrain: **{result['ratio']:.4f}**\n"
        f"- peak GPU memory: {peak_text}\n"
    )


def default_config(precision: str = "auto") -> UnlearnConfig:
    return UnlearnConfig(inversion=InversionConfig(), precision=precision)
