"""UISPS end to end (paper Alg. 1): inversion, Fisher diagonals, selection, relabel, masked pass.

The only training data it receives is `RetainedData`, which holds no sample of any forgotten label.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import DEFAULT_UNLEARN_LR, UNLEARN_LR, build_model
from core.config import UnlearnConfig
from core.data import RetainedData, Split
from core.errors import UnlearningDiverged
from core.device import Normalizer, augment, autocast, use_bf16
from core.fisher import fisher_diagonal, frozen_fraction, suppression_mask
from core.inversion import Synthetic, invert
from core.progress import ProgressFn, no_progress


@dataclass
class UnlearnOutcome:
    model: nn.Module
    frozen_fraction: float
    timings: dict[str, float]
    steps: int
    epochs_equivalent: float
    inversion_losses: dict[str, float]
    synthetic: Synthetic | None = field(default=None, repr=False)


def stratified_subset(split: Split, size: int, generator: torch.Generator) -> Split:
    """About `size` samples with every label equally represented (D'_r)."""
    labels = split.y.unique()
    per_label = max(1, size // len(labels))
    picks = []
    for lab in labels:
        idx = (split.y == lab).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_label]])
    return split.select(torch.cat(picks))


def random_model_soft_labels(
    arch: str, in_channels: int, num_classes: int, x: torch.Tensor, seed: int
) -> torch.Tensor:
    """Eq. 13: soft labels from a freshly initialised model of the same architecture, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_model(arch, in_channels, num_classes)
    teacher.to(x.device).eval()
    with torch.no_grad():
        return F.softmax(teacher(x).float(), dim=1)


class MaskedSGD:
    """SGD whose frozen elements end bit-identical to their original values.

    Momentum and weight decay move an element even when its gradient is zero, so masking the
    gradient is not enough: after every step the frozen elements are copied back.
    """

    def __init__(self, model: nn.Module, frozen: dict[str, torch.Tensor], lr: float, momentum: float, weight_decay: float) -> None:
        self.params = dict(model.named_parameters())
        self.frozen = {k: m.to(self.params[k].device) for k, m in frozen.items() if m.any()}
        self.original = {k: self.params[k].detach().clone() for k in self.frozen}
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for k, mask in self.frozen.items():
                p = self.params[k]
                p.copy_(torch.where(mask, self.original[k], p))


def resolve_steps(cfg: UnlearnConfig, n_retained: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(cfg.min_steps, math.ceil(cfg.epochs * n_retained / cfg.batch_size))


def unlearning_pass(
    model: nn.Module,
    retained: RetainedData,
    synthetic_x: torch.Tensor,
    synthetic_targets: torch.Tensor,
    frozen: dict[str, torch.Tensor],
    normalize: Normalizer,
    cfg: UnlearnConfig,
    lr: float,
    progress: ProgressFn = no_progress,
) -> int:
    """Cross-entropy on D_r (hard labels) plus D'_g (soft labels), gradient descent (eq. 14-15)."""
    device = normalize.mean.device
    x_r, y_r = retained.train.x.to(device), retained.train.y.to(device)
    n_r, n_g = len(y_r), len(synthetic_x)
    steps = resolve_steps(cfg, n_r)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = MaskedSGD(model, frozen, lr, cfg.momentum, cfg.weight_decay)
    bf16 = use_bf16(cfg.precision, device)
    k = min(cfg.synthetic_per_batch, n_g)
    per_real = cfg.batch_size - k
    if k == 0:
        # Literal reading: D'_g shuffled into the epoch once; one joint index space.
        order = lambda: torch.randperm(n_r + n_g, generator=gen)  # noqa: E731
        per_real = cfg.batch_size
    else:
        order = lambda: torch.randperm(n_r, generator=gen)  # noqa: E731
    model.train()
    if cfg.bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    perm, pos, syn_pos = order(), 0, 0
    syn_perm = torch.randperm(n_g, generator=gen) if n_g else torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if pos + per_real > len(perm):
            perm, pos = order(), 0
        idx = perm[pos : pos + per_real].to(device)
        pos += per_real
        real = idx[idx < n_r]
        inputs = normalize(x_r[real])
        if cfg.augment:
            inputs = augment(inputs, retained.flip, aug_gen)
        targets = F.one_hot(y_r[real], retained.num_classes).float()
        if k:
            syn = syn_perm[(torch.arange(k) + syn_pos) % n_g].to(device)
            syn_pos += k
        else:
            syn = idx[idx >= n_r] - n_r
        inputs = torch.cat([inputs, synthetic_x[syn]])
        targets = torch.cat([targets, synthetic_targets[syn]])
        with autocast(bf16, device):
            logits = model(inputs)
        opt.step(F.cross_entropy(logits.float(), targets))
        progress("unlearning", step + 1, steps)
    return steps


def run_uisps(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    cfg: UnlearnConfig,
    device: torch.device,
    progress: ProgressFn = no_progress,
    clock: Callable[[], float] = time.perf_counter,
) -> UnlearnOutcome:
    """Make `model` forget `forget_labels` using only `retained` data. Modifies `model` in place."""
    if set(forget_labels) - retained.forgotten:
        raise ValueError("retained data must exclude the labels being forgotten")
    model.to(device).eval()
    normalize = Normalizer(mean, std, device)
    bf16 = use_bf16(cfg.precision, device)
    in_shape = tuple(retained.train.x.shape[1:])
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = clock() - start
        return out

    synthetic: Synthetic = timed(  # type: ignore[assignment]
        "inversion", lambda: invert(model, forget_labels, in_shape, cfg.inversion, cfg.seed, bf16, progress)
    )
    frozen: dict[str, torch.Tensor] = {}
    if cfg.sps:
        def fisher() -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(cfg.seed)
            size = cfg.fisher_retain_size or min(2048, cfg.inversion.n_per_class * len(retained.train.y.unique()))
            subset = stratified_subset(retained.train, size, gen)
            f_g = fisher_diagonal(model, synthetic.x, synthetic.y, cfg.fisher_chunk, progress, "fisher")
            x_r = normalize(subset.x.to(device))
            f_r = fisher_diagonal(model, x_r, subset.y.to(device), cfg.fisher_chunk, progress, "fisher")
            return suppression_mask(f_r, f_g, cfg.alpha)
        frozen = timed("fisher", fisher)  # type: ignore[assignment]
    soft = timed("relabel", lambda: random_model_soft_labels(
        arch, in_shape[0], retained.num_classes, synthetic.x, cfg.seed))
    lr = cfg.lr or UNLEARN_LR.get(arch, DEFAULT_UNLEARN_LR)
    steps = timed("unlearning", lambda: unlearning_pass(
        model, retained, synthetic.x, soft, frozen, normalize, cfg, lr, progress))
    model.eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UnlearningDiverged(f"the unlearning pass diverged (non-finite weights) at lr {lr}; lower it")
    return UnlearnOutcome(
        model=model,
        frozen_fraction=frozen_fraction(frozen) if frozen else 0.0,
        timings=timings,
        steps=steps,  # type: ignore[arg-type]
        epochs_equivalent=steps * cfg.batch_size / max(1, len(retained.train)),  # type: ignore[operator]
        inversion_losses=synthetic.final_losses,
        synthetic=synthetic,
    )
