"""Which memory layout each UISPS stage should use on this CPU: one ResNet18 inversion step (32
images, BatchNorm-statistics hooks, gradients to the input only) and one training step (128 images,
as in the unlearning pass), contiguous against channels_last, in fp32 and under bf16 autocast.

    python scripts/cpu_layout_check.py      # prints ms per step; core/uisps.py picks per stage

The bf16 rows show whether `use_bf16("auto")` is right to pick bf16 on this CPU: on a CPU without
native bf16 (AVX512-BF16 or AMX) oneDNN emulates it, and it is slower than fp32.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from core.architectures import build_model
from core.bench_cache import cpu_name
from core.device import autocast, cpu_has_native_bf16, use_bf16
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; "
          f"native bf16: {cpu_has_native_bf16()}, so auto precision uses bf16 autocast: {use_bf16('auto', CPU)}")
    for bf16 in (False, True):
        for name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            print(f"{'bf16' if bf16 else 'fp32'} {name:14s} inversion step {inversion_step_ms(layout, bf16):7.1f} ms   "
                  f"training step {training_step_ms(layout, bf16):7.1f} ms")


if __name__ == "__main__":
    main()
