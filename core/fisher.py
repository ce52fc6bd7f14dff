"""Diagonal of the empirical Fisher information (paper eq. 9-11) and the SPS selection (eq. 12).

F_i = mean over samples of (d log p(y|x) / d theta_i)^2, from true per-sample gradients
(torch.func.vmap over chunks), never from the square of a batch gradient. The model is in eval
mode, so BatchNorm uses its running statistics and samples do not interact. The Fisher-forgetting
baseline takes the true Fisher instead (`expected_fisher_diagonal`: labels from the model's own
predictive distribution, summed over every class).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from core.progress import ProgressFn, no_progress

FisherDiag = dict[str, torch.Tensor]


def _log_likelihood_grads(model: nn.Module) -> tuple[dict[str, torch.Tensor], Callable]:
    """The model's trainable parameters and a function of (params, x, y) giving each sample's
    gradient of log p(y|x), vmapped over the samples of a chunk."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def log_likelihood(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.log_softmax(logits, dim=1)[0].gather(0, yi.unsqueeze(0)).squeeze(0)

    return params, vmap(grad(log_likelihood), in_dims=(None, 0, 0))


def fisher_diagonal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int = 16,
    progress: ProgressFn = no_progress,
    stage: str = "fisher",
) -> FisherDiag:
    """Per-sample squared gradients of log p(y|x), averaged over the set. `x` is normalised."""
    params, per_sample_grad = _log_likelihood_grads(model)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = len(y)
    for start in range(0, n, chunk):
        grads = per_sample_grad(params, x[start : start + chunk], y[start : start + chunk])
        for k, g in grads.items():
            total[k] += g.pow(2).sum(dim=0)
        progress(stage, min(start + chunk, n), n)
    return {k: v / n for k, v in total.items()}


def expected_fisher_diagonal(model: nn.Module, x: torch.Tensor, num_classes: int, chunk: int = 16) -> FisherDiag:
    """The true Fisher's diagonal: the mean over samples of sum_y p(y|x) (d log p(y|x) / d theta)^2,
    the expectation over the model's own predictive distribution, one label at a time (what
    Golatkar et al.'s `hessian()` sums). `num_classes` times the cost of `fisher_diagonal`."""
    params, per_sample_grad = _log_likelihood_grads(model)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, len(x), chunk):
        xc = x[start : start + chunk]
        with torch.no_grad():
            probs = F.softmax(model(xc).float(), dim=1)
        if probs.shape[1] != num_classes:  # a label left out would drop its share of the sum
            raise ValueError(f"the model has {probs.shape[1]} outputs, not {num_classes} classes")
        for label in range(num_classes):
            y = torch.full((len(xc),), label, dtype=torch.long, device=x.device)
            grads = per_sample_grad(params, xc, y)
            for k, g in grads.items():
                # g is vmap's own output: squared in place, weighted and summed over the chunk
                # without another chunk-sized temporary
                total[k].add_(torch.tensordot(probs[:, label].to(g.dtype), g.square_(), dims=1))
    return {k: v / len(x) for k, v in total.items()}


def fisher_diagonal_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FisherDiag:
    """Reference implementation, one backward pass per sample (slow; used by the tests)."""
    model.eval()
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for xi, yi in zip(x, y, strict=True):
        logp = F.log_softmax(model(xi.unsqueeze(0)), dim=1)[0, yi]
        grads = torch.autograd.grad(logp, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            total[k] += g.pow(2)
    return {k: v / len(y) for k, v in total.items()}


def minmax_normalize(fisher: FisherDiag) -> FisherDiag:
    """Eq. 11 over all parameters of the model together (one global min and max)."""
    flat = torch.cat([v.flatten() for v in fisher.values()])
    lo, hi = flat.min(), flat.max()
    scale = (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return {k: (v - lo) / scale for k, v in fisher.items()}


def suppression_mask(fisher_retain: FisherDiag, fisher_forget: FisherDiag, alpha: float) -> dict[str, torch.Tensor]:
    """Eq. 12: True where a parameter element is frozen (norm_r > alpha * norm_g)."""
    r, g = minmax_normalize(fisher_retain), minmax_normalize(fisher_forget)
    return {k: r[k] > alpha * g[k] for k in r}


def dampening_scale(fisher_retain: FisherDiag, fisher_forget: FisherDiag, dampen: float) -> FisherDiag:
    """Per-element factors: dampen * norm_r / norm_g where norm_g > dampen * norm_r, else 1.

    The elements far more important to the forgotten classes than to the retained ones shrink in
    proportion to that imbalance (Foster et al.'s Selective Synaptic Dampening, here on D'_g)."""
    r, g = minmax_normalize(fisher_retain), minmax_normalize(fisher_forget)
    # where g is 0 nothing is selected, so the quotient's 0/0 there is never used
    return {k: torch.where(g[k] > dampen * r[k], dampen * r[k] / g[k], 1.0) for k in r}


def frozen_fraction(mask: dict[str, torch.Tensor]) -> float:
    frozen = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return frozen / total if total else 0.0
