"""On CUDA: does the graphed inversion give the same images as the eager one?

Runs the eager path twice (run-to-run noise of the GPU kernels, amplified by the optimisation) and
the graphed path once, in fp32, for a short and a longer run; prints one JSON line with the
differences and the time per iteration. Run: python scripts/check_cuda_graph.py
"""

import json
import time

import torch

from core.architectures import build_model
from core.config import InversionConfig
from core.inversion import invert


def run(model: torch.nn.Module, iterations: int, graph: bool) -> tuple[torch.Tensor, float]:
    cfg = InversionConfig(iterations=iterations, cuda_graph=graph)
    torch.cuda.synchronize()
    start = time.perf_counter()
    x = invert(model, [0, 1], (3, 32, 32), cfg, seed=0, bf16=False).x
    torch.cuda.synchronize()
    return x, (time.perf_counter() - start) / iterations


def main() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10).cuda().to(memory_format=torch.channels_last).eval()
    run(model, 5, False), run(model, 5, True)  # warm-up
    result = {}
    for iterations in (10, 200):
        eager_a, t_eager = run(model, iterations, False)
        eager_b, _ = run(model, iterations, False)
        graphed, t_graph = run(model, iterations, True)
        result[f"it{iterations}"] = {
            "eager_vs_eager_max_abs": (eager_a - eager_b).abs().max().item(),
            "graph_vs_eager_max_abs": (graphed - eager_a).abs().max().item(),
            "graph_vs_eager_mean_abs": (graphed - eager_a).abs().mean().item(),
            "seconds_per_iteration_eager": t_eager,
            "seconds_per_iteration_graph": t_graph,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
