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

from core.architectures import RELABEL_STREAM, RESET_BLOCKS_STREAM, feature_blocks, seeded_model, unlearning_lr
from core.config import UnlearnConfig
from core.data import RetainedData, Split
from core.errors import ArchitectureError, UnlearningDiverged
from core.device import Normalizer, augment, autocast, seeded_randomness, use_bf16
from core.fisher import FisherDiag, dampening_scale, fisher_diagonal, frozen_fraction, suppression_mask
from core.inversion import Synthetic, invert
from core.progress import ProgressFn, no_progress


@dataclass
class UnlearnOutcome:
    model: nn.Module
    frozen_fraction: float
    dampened_fraction: float
    head_reset: bool
    blocks_reset: int
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
    teacher = seeded_model(arch, in_channels, num_classes, seed, RELABEL_STREAM)
    teacher.to(x.device).eval()
    with torch.no_grad():
        return F.softmax(teacher(x).float(), dim=1)


def without_labels(soft: torch.Tensor, labels: set[int]) -> torch.Tensor:
    """`soft` with the mass of `labels` removed and each row renormalised to sum to 1."""
    keep = torch.ones(soft.shape[1], dtype=torch.bool, device=soft.device)
    keep[sorted(labels)] = False
    kept = soft * keep
    return kept / kept.sum(dim=1, keepdim=True)


def scheduled_lr(schedule: str, lr: float, step: int, steps: int) -> float:
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return lr


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

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for k, mask in self.frozen.items():
                p = self.params[k]
                p.copy_(torch.where(mask, self.original[k], p))


@torch.no_grad()
def dampen_parameters(model: nn.Module, scale: FisherDiag) -> float:
    """Multiply each parameter by its factor in `scale`; returns the share of elements shrunk."""
    shrunk = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name in scale:
            p.mul_(scale[name].to(p.dtype))
            shrunk += int((scale[name] < 1).sum())
    return shrunk / total if total else 0.0


def output_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The last linear layer with one output per class: the head whose rows are class templates."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise ArchitectureError(f"reset_head needs a final linear layer with {num_classes} outputs")
    return found[-1]


def check_feature_scrub(model: nn.Module, cfg: UnlearnConfig) -> None:
    """The feature scrub reads penultimate features, which only this project's own architectures expose."""
    if cfg.feature_scrub and not (hasattr(model, "features") and hasattr(model, "head")):
        raise ArchitectureError("feature_scrub needs one of this project's own architectures (features + head)")


def resets_head(model: nn.Module, num_classes: int, cfg: UnlearnConfig) -> bool:
    """Whether this pass resets the forgotten output rows. On by default; a model without a final
    linear layer (torchvision's squeezenet ends in a convolution) skips it unless it was asked for."""
    if not cfg.reset_head:
        return False
    try:
        output_layer(model, num_classes)
    except ArchitectureError:
        if "reset_head" in cfg.model_fields_set:
            raise
        return False
    return True


@torch.no_grad()
def reset_output_rows(model: nn.Module, labels: list[int], num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Re-initialise the output rows of `labels` as a fresh (seeded) linear layer's; returns, per
    parameter name, a mask of the elements reset."""
    name, head = output_layer(model, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's alone: fork_rng restores only it
        fresh = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    rows = torch.tensor(sorted(labels))
    reset: dict[str, torch.Tensor] = {}
    for suffix in ("weight", "bias"):
        p, q = getattr(head, suffix), getattr(fresh, suffix)
        if p is None:
            continue
        p[rows] = q[rows].to(p.device, p.dtype)
        mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        mask[rows] = True
        reset[f"{name}.{suffix}"] = mask
    return reset


def blocks_to_reset(model: nn.Module, cfg: UnlearnConfig) -> int:
    """How many feature blocks this pass re-initialises; fails (before any work) where the model
    has fewer, or none to cut (a torchvision model) while some were asked for."""
    n = cfg.reset_blocks
    if n == 0:
        return 0
    available = len(feature_blocks(model))
    if n >= available:
        raise ArchitectureError(f"reset_blocks={n}, but the model has {available} feature blocks; at least one must stay")
    return n


@torch.no_grad()
def reset_feature_blocks(model: nn.Module, arch: str, in_channels: int, num_classes: int, n: int, seed: int) -> set[str]:
    """Give the last `n` feature blocks a fresh (seeded) model's parameters and BatchNorm
    statistics; returns the names of the parameters reset."""
    fresh = dict(feature_blocks(seeded_model(arch, in_channels, num_classes, seed, RESET_BLOCKS_STREAM)))
    reset: set[str] = set()
    for name, block in feature_blocks(model)[-n:]:
        block.load_state_dict(fresh[name].state_dict())
        reset |= {f"{name}.{p}" for p, _ in block.named_parameters()}
    return reset


def resolve_steps(cfg: UnlearnConfig, n_retained: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(cfg.min_steps, math.ceil(cfg.epochs * n_retained / cfg.batch_size))


def epochs_of_retained(cfg: UnlearnConfig, steps: int, n_retained: int, n_synthetic: int) -> float:
    """How many epochs of the retained data `steps` batches hold: a batch carrying k synthetic
    samples holds batch_size - k retained ones; a pool shuffled together, its retained share."""
    k = min(cfg.synthetic_per_batch, n_synthetic)
    per_batch = cfg.batch_size - k if k else cfg.batch_size * n_retained / max(1, n_retained + n_synthetic)
    return steps * min(per_batch, n_retained) / max(1, n_retained)


def feature_scrub_loss(feats: torch.Tensor, n_real: int) -> torch.Tensor:
    """Mean squared distance of the synthetic rows' features (after the first `n_real`) to the
    retained rows' mean feature, relative to the retained features' mean squared norm (so the
    weight means the same at any feature scale). Zero for a batch without synthetic rows."""
    real, syn = feats[:n_real], feats[n_real:]
    if not len(syn):
        return feats.sum() * 0.0
    target = real.mean(dim=0).detach()
    scale = real.detach().pow(2).sum(dim=1).mean().clamp_min(1e-12)
    return (syn - target).pow(2).sum(dim=1).mean() / scale


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
    # k == 0: the literal reading, D'_g shuffled into the epoch once (one joint index space).
    # k > 0: each batch is batch_size - k retained samples plus k synthetic ones, cycling D'_g.
    per_real, pool = (cfg.batch_size - k, n_r) if k else (cfg.batch_size, n_r + n_g)
    model.train()
    if cfg.bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    # index tensors live on the device so the loop issues no host synchronisation
    perm, pos = torch.randperm(pool, generator=gen).to(device), 0
    syn_perm = torch.randperm(n_g, generator=gen).to(device)
    syn_offsets = torch.arange(k, device=device)
    with seeded_randomness(cfg.seed, device):  # dropout, in the models that have it
        for step in range(steps):
            if pos + per_real > pool:
                perm, pos = torch.randperm(pool, generator=gen).to(device), 0
            idx = perm[pos : pos + per_real]
            pos += per_real
            if k:
                real, syn = idx, syn_perm[(syn_offsets + step * k) % n_g]
            else:
                real, syn = idx[idx < n_r], idx[idx >= n_r] - n_r
            inputs = normalize(x_r[real])
            if cfg.augment:
                inputs = augment(inputs, retained.flip, aug_gen)
            # scatter, not F.one_hot, which checks its input range with a host sync on CUDA
            targets = torch.zeros(len(real), retained.num_classes, device=device).scatter_(1, y_r[real, None], 1.0)
            inputs = torch.cat([inputs, synthetic_x[syn]])
            targets = torch.cat([targets, synthetic_targets[syn]])
            with autocast(bf16, device):
                feats = model.features(inputs) if cfg.feature_scrub else None
                logits = model(inputs) if feats is None else model.head(feats)
            loss = F.cross_entropy(logits.float(), targets)
            if feats is not None:
                loss = loss + cfg.feature_scrub * feature_scrub_loss(feats.float(), len(real))
            opt.set_lr(scheduled_lr(cfg.lr_schedule, lr, step, steps))
            opt.step(loss)
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
    synthetic: Synthetic | None = None,
) -> UnlearnOutcome:
    """Make `model` forget `forget_labels` using only `retained` data. Modifies `model` in place.

    `synthetic`: a D_g already inverted from this same model, forget labels, inversion settings
    and seed (the paper benchmark reuses one inversion across runs); its stage time is then 0.
    """
    if set(forget_labels) - retained.forgotten:
        raise ValueError("retained data must exclude the labels being forgotten")
    check_feature_scrub(model, cfg)
    reset_head = resets_head(model, retained.num_classes, cfg)  # fails before the inversion, not after
    reset_blocks = blocks_to_reset(model, cfg)
    # channels_last gives cuDNN's fastest convolutions, and oneDNN's for the pass's training steps;
    # but the inversion on CPU runs ~10 % faster contiguous (docs/results/README.md, CPU)
    inversion_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=inversion_format).eval()
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

    if synthetic is None:
        synthetic = timed(  # type: ignore[assignment]
            "inversion", lambda: invert(model, forget_labels, in_shape, cfg.inversion, cfg.seed, bf16, progress)
        )
    else:
        if sorted(set(synthetic.y.tolist())) != sorted(forget_labels):
            raise ValueError("the synthetic samples handed in were not inverted for these forget labels")
        timings["inversion"] = 0.0
    frozen: dict[str, torch.Tensor] = {}
    dampened = 0.0
    if cfg.sps or cfg.dampen:
        def fisher() -> tuple[FisherDiag, FisherDiag]:
            gen = torch.Generator().manual_seed(cfg.seed)
            size = cfg.fisher_retain_size or min(2048, cfg.inversion.n_per_class * len(retained.train.y.unique()))
            subset = stratified_subset(retained.train, size, gen)
            f_g = fisher_diagonal(model, synthetic.x, synthetic.y, cfg.fisher_chunk, progress, "fisher")
            x_r = normalize(subset.x.to(device))
            f_r = fisher_diagonal(model, x_r, subset.y.to(device), cfg.fisher_chunk, progress, "fisher")
            return f_r, f_g
        f_r, f_g = timed("fisher", fisher)  # type: ignore[misc]
        if cfg.sps:
            frozen = suppression_mask(f_r, f_g, cfg.alpha)
        if cfg.dampen:
            dampened = dampen_parameters(model, dampening_scale(f_r, f_g, cfg.dampen))
    if reset_head:
        # after the Fisher stage, which must see the model D'_g was inverted from
        for name, rows in reset_output_rows(model, forget_labels, retained.num_classes, cfg.seed).items():
            if name in frozen:
                frozen[name] = frozen[name] & ~rows
    if reset_blocks:
        for name in reset_feature_blocks(model, arch, in_shape[0], retained.num_classes, reset_blocks, cfg.seed):
            if name in frozen:  # kept, all False, so frozen_fraction still counts every element
                frozen[name] = torch.zeros_like(frozen[name])
    soft = timed("relabel", lambda: random_model_soft_labels(
        arch, in_shape[0], retained.num_classes, synthetic.x, cfg.seed))
    if cfg.relabel_exclude_forgotten:
        soft = without_labels(soft, retained.forgotten)  # type: ignore[arg-type]
    lr = cfg.lr or unlearning_lr(arch, paper=cfg.preset == "paper")
    model.to(memory_format=torch.channels_last)
    steps = timed("unlearning", lambda: unlearning_pass(
        model, retained, synthetic.x, soft, frozen, normalize, cfg, lr, progress))
    model.eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UnlearningDiverged(f"the unlearning pass diverged (non-finite weights) at lr {lr}; lower it")
    return UnlearnOutcome(
        model=model,
        frozen_fraction=frozen_fraction(frozen) if frozen else 0.0,
        dampened_fraction=dampened,
        head_reset=reset_head,
        blocks_reset=reset_blocks,
        timings=timings,
        steps=steps,  # type: ignore[arg-type]
        epochs_equivalent=epochs_of_retained(cfg, steps, len(retained.train), len(synthetic.x)),  # type: ignore[arg-type]
        inversion_losses=synthetic.final_losses,
        synthetic=synthetic,
    )
