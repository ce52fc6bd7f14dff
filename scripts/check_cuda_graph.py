"""On CUDA: the graphed inversion gives the same images as the eager one (fast path == plain path).

Also times both. Run: python scripts/check_cuda_graph.py  (prints one JSON line)
"""

import json
import time

import torch

from core.architectures import build_model
from core.config import InversionConfig
from core.inversion import invert


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10).to(device, memory_format=torch.channels_last).eval()
    result = {}
    images = {}
    for graph in (False, True):
        cfg = InversionConfig(iterations=200, cuda_graph=graph)
        invert(model, [0, 1], (3, 32, 32), cfg.model_copy(update={"iterations": 5}), seed=0, bf16=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        images[graph] = invert(model, [0, 1], (3, 32, 32), cfg, seed=0, bf16=True).x
        torch.cuda.synchronize()
        result[f"seconds_per_iteration_graph_{graph}"] = (time.perf_counter() - start) / cfg.iterations
    result["max_abs_diff"] = (images[True] - images[False]).abs().max().item()
    result["max_abs_value"] = images[False].abs().max().item()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
