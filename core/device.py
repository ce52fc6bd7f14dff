"""Device, precision and input plumbing shared by training, unlearning and evaluation."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from core.errors import DeviceUnavailable


def pick_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N` or `mps`; anything this machine cannot run on
    is a DeviceUnavailable naming what it has, not a driver traceback at the first tensor."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailable(f"device {name!r}: this machine has no usable CUDA GPU (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailable(f"device {name!r}: this machine has no usable Apple GPU (use auto or cpu)")
    elif device.type != "cpu":
        raise DeviceUnavailable(f"device {name!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX: 2.7x faster ResNet18
    training steps on a 2-core AMX machine of this project); fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 itself: on x86, the AVX512-BF16 or AMX instructions.

    Not oneDNN's `_is_mkldnn_bf16_supported()` on x86: that is true on any AVX-512 CPU, where
    oneDNN emulates bf16, and there autocast is about twice as slow as fp32 (a ResNet18 training
    step of 128 images on a 2-core AVX-512 Xeon without either: 17.6 s in bf16 against 8.1 s in
    fp32; `scripts/cpu_layout_check.py`, its output in `docs/results/cpu-layout-avx512-no-bf16.txt`).
    Elsewhere (Arm: its BF16 extension) oneDNN's flag is the CPU's own.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        cpu = torch.cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    # no weight-cast cache: it is unsafe under CUDA graph capture and saves little here
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


class Normalizer:
    """uint8 images -> normalised float tensors, with the statistics that travel with the model."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div(255) - self.mean) / self.std


def augment(x: torch.Tensor, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with 4-pixel (or H/8) reflect padding and optional horizontal flip, on the device."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    idx_rows = rows.expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, idx_rows).gather(3, cols.expand(n, x.shape[1], h, w))
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(3), out)
    return out


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


@contextlib.contextmanager
def seeded_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """The global random state (the CPU's, and `device`'s on CUDA) seeded for a block and restored
    after it: what draws from it (dropout in torchvision models) is reproducible by seed, on the
    CPU and on CUDA alike, and the caller's state is left alone."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, normalize: Normalizer, batch_size: int = 512) -> torch.Tensor:
    device = normalize.mean.device
    model.eval()
    out = [model(normalize(x[i : i + batch_size].to(device))).float() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
