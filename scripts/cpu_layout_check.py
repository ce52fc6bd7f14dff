"""Which memory layout each UISPS stage should use on this CPU: one ResNet18 inversion step (32
images, BatchNorm-statistics hooks, gradients to the input only) and one training step (128 images,
as in the unlearning pass), contiguous against channels_last, bf16 autocast where the CPU has it.

    python scripts/cpu_layout_check.py      # prints ms per step; core/uisps.py picks per stage
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from core.architectures import build_model
from core.device import autocast, use_bf16
from core.inversion import BatchNormStatistics

CPU = torch.device("cpu")


def ms_per_call(fn, repeats: int) -> float:
    fn(), fn()  # warm-up: oneDNN picks and caches its kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def inversion_step_ms(layout: torch.memory_format, bf16: bool) -> float:
    model = build_model("resnet18", 3, 10).to(memory_format=layout).eval().requires_grad_(False)
    x = torch.randn(32, 3, 32, 32).requires_grad_(True)  # contiguous, as core.inversion makes it
    y = torch.zeros(32, dtype=torch.long)
    stats = BatchNormStatistics(model, groups=1)

    def step() -> None:
        x.grad = None
        with autocast(bf16, CPU):
            logits = model(x).float()
        (F.cross_entropy(logits, y) + 0.01 * stats.pop_loss()).backward()

    try:
        return ms_per_call(step, 8)
    finally:
        stats.remove()


def training_step_ms(layout: torch.memory_format, bf16: bool) -> float:
    model = build_model("resnet18", 3, 10).to(memory_format=layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.zeros(128, dtype=torch.long)  # inputs as the pass makes them

    def step() -> None:
        with autocast(bf16, CPU):
            logits = model(x).float()
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()

    return ms_per_call(step, 4)


def main() -> None:
    bf16 = use_bf16("auto", CPU)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast: {bf16}")
    for name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        print(f"{name:14s} inversion step {inversion_step_ms(layout, bf16):7.1f} ms   "
              f"training step {training_step_ms(layout, bf16):7.1f} ms")


if __name__ == "__main__":
    main()
