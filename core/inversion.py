"""Data-free inversion (paper Sec. IV-B, eq. 1-5): synthetic stand-ins for the forgotten classes.

The model stays in eval mode. A forward hook on every BatchNorm layer records the batch mean and
biased variance of that layer's input, which eq. 2 pulls toward the layer's running statistics.
With `batched`, all forget labels share one batch but every statistic is computed per label group,
so the optimisation equals one run per label (see `tests/core/test_inversion.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import inverted_batchnorm_layers
from core.config import InversionConfig
from core.device import autocast
from core.errors import ArchitectureError
from core.progress import ProgressFn, no_progress


@dataclass
class Synthetic:
    x: torch.Tensor  # normalised inputs (N, C, H, W), grouped by label
    y: torch.Tensor  # target forget label of each sample
    entropy_subset: torch.Tensor  # bool mask of the samples whose entropy was regularised
    final_losses: dict[str, float]


class BatchNormStatistics:
    """Forward hooks that collect per-group input statistics of every BatchNorm layer."""

    def __init__(self, model: nn.Module, groups: int) -> None:
        self.groups = groups
        self.losses: list[torch.Tensor] = []
        layers = inverted_batchnorm_layers(model)
        if not layers:  # registration refuses such a model; a checkpoint used directly may still be one
            raise ArchitectureError("the model has no BatchNorm layer with running statistics to invert")
        self.handles = [bn.register_forward_hook(self._hook) for bn in layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        mean, var = group_moments(inputs[0], self.groups)
        rm = module.running_mean.to(mean.dtype)
        rv = module.running_var.to(var.dtype)
        # ||mu - E mu||_2 + ||var - E var||_2 per group, summed over groups (eq. 2)
        self.losses.append(torch.linalg.vector_norm(mean - rm, dim=1).sum()
                           + torch.linalg.vector_norm(var - rv, dim=1).sum())

    def pop_loss(self) -> torch.Tensor:
        loss = torch.stack(self.losses).sum()
        self.losses.clear()
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (N, H, W) of each of `groups` equal slices of the batch, in fp32.

    E[x^2] - E[x]^2 over a view of `x` (no transposed copy; `var` over a transposed copy made the
    BatchNorm term cost about as much as the rest of an inversion step on CPU). A BatchNorm
    input's mean is not large against its spread, so the difference keeps fp32's precision.
    """
    g = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1).float()  # the reshape is a view in either layout
    mean = g.mean(dim=(1, 3))
    return mean, (g.square().mean(dim=(1, 3)) - mean.square()).clamp_min(0.0)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    # clamped so that a probability of exactly 0 contributes 0, not 0 * -inf
    return -(logp.exp() * logp.clamp_min(-1e4)).sum(dim=1)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def _prior_transform(x: torch.Tensor, cfg: InversionConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.jitter:
        dx, dy = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if cfg.flip and torch.rand((), generator=gen).item() < 0.5:
        x = x.flip(3)
    return x


def invert_group(
    model: nn.Module,
    labels: list[int],
    x0: torch.Tensor,
    cfg: InversionConfig,
    prior_gen: torch.Generator,
    bf16: bool = False,
    progress: ProgressFn = no_progress,
) -> Synthetic:
    """Optimise `n_per_class` inputs per label, from `x0`, in one batch with per-label loss terms."""
    device = next(model.parameters()).device
    k, n = len(labels), cfg.n_per_class
    x = x0.to(device).requires_grad_(True)
    y = torch.tensor(labels, device=device).repeat_interleave(n)
    n_sub = round(cfg.entropy_fraction * n)
    subset = (torch.arange(n, device=device) < n_sub).repeat(k)
    use_graph = cfg.cuda_graph and device.type == "cuda" and not (cfg.jitter or cfg.flip)
    opt = torch.optim.Adam([x], lr=cfg.lr, capturable=use_graph)
    model.eval()
    stats = BatchNormStatistics(model, k)

    def objective() -> dict[str, torch.Tensor]:
        inputs = _prior_transform(x, cfg, prior_gen)
        with autocast(bf16, device):
            logits = model(inputs).float()
        # per-group means summed over groups: the sum of K independent per-label losses
        ce = F.cross_entropy(logits, y, reduction="none").view(k, n).mean(dim=1).sum()
        bn = stats.pop_loss()
        ent_term = (entropy(logits) * subset).view(k, n).sum(dim=1).div(max(n_sub, 1)).sum()
        loss = ce + cfg.lambda_bn * bn - cfg.entropy_sign * cfg.lambda_entropy * ent_term
        if cfg.tv_weight:
            loss = loss + cfg.tv_weight * k * _total_variation(x)
        if cfg.l2_weight:
            loss = loss + cfg.l2_weight * k * x.pow(2).mean()
        return {"ce": ce, "bn": bn, "entropy": ent_term, "total": loss}

    def step() -> dict[str, torch.Tensor]:
        parts = objective()
        parts["total"].backward()
        opt.step()
        # detached, so no autograd node of this iteration outlives it (a node kept alive across
        # the warm-up on a side stream breaks the CUDA graph captured afterwards)
        return {key: value.detach() for key, value in parts.items()}

    # only the images are optimised: no weight gradients are computed or left on the model
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in requires_grad:
        p.requires_grad_(False)
    try:
        parts = _run_graphed(step, x, cfg.iterations, progress) if use_graph else _run_eager(step, x, cfg.iterations, progress)
    finally:
        stats.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    losses = {key: float(value.detach()) for key, value in parts.items()}
    return Synthetic(x.detach(), y, subset, losses)


def _run_eager(step: Callable[[], dict[str, torch.Tensor]], x: torch.Tensor, iterations: int, progress: ProgressFn) -> dict[str, torch.Tensor]:
    parts: dict[str, torch.Tensor] = {}
    for it in range(iterations):
        x.grad = None
        parts = step()
        if it % 50 == 0 or it == iterations - 1:
            progress("inversion", it + 1, iterations)
    return parts


def _run_graphed(step: Callable[[], dict[str, torch.Tensor]], x: torch.Tensor, iterations: int, progress: ProgressFn) -> dict[str, torch.Tensor]:
    """The same iterations, replayed from one captured CUDA graph: about a thousand small
    kernels per iteration are launched once instead of `iterations` times."""
    warmup = min(3, iterations)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        parts = _run_eager(step, x, warmup, progress)
    torch.cuda.current_stream().wait_stream(side)
    if iterations == warmup:
        return parts
    graph = torch.cuda.CUDAGraph()
    x.grad = None  # backward then allocates the gradient from the graph's private pool
    with torch.cuda.graph(graph):
        parts = step()
    for it in range(warmup, iterations):
        graph.replay()
        if it % 50 == 0 or it == iterations - 1:
            progress("inversion", it + 1, iterations)
    return parts


def invert(
    model: nn.Module,
    forget_labels: list[int],
    input_shape: tuple[int, int, int],
    cfg: InversionConfig,
    seed: int,
    bf16: bool = False,
    progress: ProgressFn = no_progress,
) -> Synthetic:
    """Synthesise D_g. Batched: one run over all labels; else one run per label (the paper's loop).

    Initial inputs are N(0, 1) in the normalised input space, drawn per label in label order, so
    both paths start from the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = [torch.randn((cfg.n_per_class, *input_shape), generator=generator) for _ in forget_labels]
    prior_gen = torch.Generator().manual_seed(seed + 1)
    if cfg.batched:
        return invert_group(model, forget_labels, torch.cat(x0), cfg, prior_gen, bf16, progress)
    parts = [
        invert_group(model, [lab], init, cfg, prior_gen, bf16, progress)
        for lab, init in zip(forget_labels, x0, strict=True)
    ]
    return Synthetic(
        torch.cat([p.x for p in parts]),
        torch.cat([p.y for p in parts]),
        torch.cat([p.entropy_subset for p in parts]),
        {key: sum(p.final_losses[key] for p in parts) for key in parts[0].final_losses},
    )
