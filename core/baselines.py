"""Unlearning baselines of the paper's comparison (Sec. V-A, App. D), each one function.

Every method has the same signature::

    method(model, arch, retained, forget_labels, mean, std, device, seed, cfg=..., ...) -> model

and returns the unlearned model (in place where it trains; `retrain` returns a new one and
`head_mask` a wrapper). `retained` is a `RetainedData`, which holds no sample of any forgotten
label; a zero-glance method refuses anything else (a `Dataset` or a `Split`) with a `TypeError`.
Only `amnesiac` reads forgotten samples: it is marked `needs_forget_data` and takes them as a
separate, explicit `forget_train` split.

A method may fill the optional `info` dict with what it did (steps, frozen fraction, timings).

Constants are the published ones where they transfer, else chosen and documented here; the
configs are small frozen dataclasses so that a benchmark preset can change any number.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import (
    INCOMPETENT_TEACHER_STREAM,
    penultimate_features,
    seeded_model,
    unlearning_lr,
)
from core.config import InversionConfig, TrainConfig, UnlearnConfig
from core.data import RetainedData, Split
from core.device import Normalizer, augment, autocast, seeded_randomness, use_bf16
from core.fisher import expected_fisher_diagonal, fisher_diagonal, frozen_fraction, suppression_mask
from core.inversion import Synthetic, invert
from core.training import train
from core.uisps import MaskedSGD, run_uisps, scheduled_lr, stratified_subset

Info = dict


# --- plumbing -------------------------------------------------------------------------------


def require_retained(retained: object, forget_labels: list[int]) -> RetainedData:
    """The zero-glance contract: only `RetainedData` that excludes every label being forgotten."""
    if not isinstance(retained, RetainedData):
        raise TypeError(
            f"a zero-glance method takes RetainedData (no forgotten sample), not {type(retained).__name__}"
        )
    if not forget_labels:
        raise ValueError("no labels to forget")
    if set(forget_labels) - retained.forgotten:
        raise ValueError("retained data must exclude the labels being forgotten")
    return retained


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """channels_last on CUDA (cuDNN's fastest convolutions), as core.training and core.uisps do."""
    fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return model.to(device, memory_format=fmt)


def random_model(arch: str, in_channels: int, num_classes: int, seed: int, device: torch.device) -> nn.Module:
    """A freshly initialised model of `arch`, seeded (not the Original's start: its own stream)."""
    return to_device(seeded_model(arch, in_channels, num_classes, seed, INCOMPETENT_TEACHER_STREAM), device).eval()


class Shuffler:
    """Endless mini-batches of indices into `n` samples, reshuffled every epoch.

    Every batch has the same size (an epoch's remainder is dropped), so cuDNN tunes one shape;
    the permutation lives on the device, so drawing a batch never synchronises with the host.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.n, self.batch_size = n, max(1, min(batch_size, n))
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen).to(self.device), 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size)

    def __call__(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self._reshuffle()
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def _normalized(split: Split, normalize: Normalizer) -> tuple[torch.Tensor, torch.Tensor]:
    device = normalize.mean.device
    return normalize(split.x.to(device)), split.y.to(device)


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    opt: torch.optim.Optimizer,
    batch_size: int,
    seed: int,
    bf16: bool,
    do_augment: bool,
    flip: bool,
) -> int:
    """Plain cross-entropy training on normalised inputs `x` with hard labels `y`."""
    device = x.device
    shuffle = Shuffler(len(y), batch_size, seed, device)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    model.train()
    with seeded_randomness(seed, device):  # dropout, in the models that have it
        for _ in range(steps):
            idx = shuffle()
            inputs = augment(x[idx], flip, aug_gen) if do_augment else x[idx]
            with autocast(bf16, device):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return steps


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _epoch_steps(epochs: float, n: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * max(1, n // max(1, min(batch_size, n)))))


# --- Retrain (the reference) ------------------------------------------------------------------


def retrain(
    model: nn.Module | None,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: TrainConfig | None = None,
    info: Info | None = None,
) -> nn.Module:
    """A new model of `arch` trained from scratch on D_r with the Original's recipe (the given
    `model` is not read). Same initialisation and loop as `core.workflow.train_model`."""
    require_retained(retained, forget_labels)
    cfg = (cfg or TrainConfig()).model_copy(update={"seed": seed})
    in_channels = int(retained.train.x.shape[1])
    fresh = seeded_model(arch, in_channels, retained.num_classes, cfg.seed)
    train(fresh, retained.train, Normalizer(mean, std, device), cfg, retained.flip)
    if info is not None:
        info["epochs"] = cfg.epochs
    return fresh.eval()


# --- Fine-tune -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Plain SGD on D_r. 5 epochs at a constant lr 0.02 (momentum 0.9) follows the fine-tune
    baseline of the UNSIR and bad-teacher papers (their "a few epochs at a moderate lr").
    `min_steps` floors the pass like UISPS's default pass (350): rows with equal budgets."""

    epochs: float = 5.0
    min_steps: int = 0
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    precision: str = "auto"


def finetune(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: FinetuneConfig = FinetuneConfig(),
    info: Info | None = None,
) -> nn.Module:
    require_retained(retained, forget_labels)
    to_device(model, device)
    x, y = _normalized(retained.train, Normalizer(mean, std, device))
    steps = max(cfg.min_steps, _epoch_steps(cfg.epochs, len(y), cfg.batch_size))
    opt = _sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    _fit(model, x, y, steps, opt, cfg.batch_size, seed, use_bf16(cfg.precision, device), cfg.augment, retained.flip)
    if info is not None:
        info["steps"] = steps
    return model


# --- Amnesiac (NOT zero-glance) -----------------------------------------------------------------


@dataclass(frozen=True)
class AmnesiacConfig:
    """Graves et al.'s relabelling variant as the comparison papers run it: the forgotten
    training samples get random *wrong* labels, drawn once (seeded) from the retained classes
    (never another forgotten class), and the model trains on D_r plus those, for one epoch.
    `min_steps` floors the pass (rows with UISPS's budget of steps)."""

    epochs: float = 1.0
    min_steps: int = 0
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    precision: str = "auto"


def amnesiac(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    forget_train: Split,
    cfg: AmnesiacConfig = AmnesiacConfig(),
    info: Info | None = None,
) -> nn.Module:
    """Needs the forgotten classes' training samples (`forget_train`): not zero-glance."""
    require_retained(retained, forget_labels)
    if not isinstance(forget_train, Split) or not len(forget_train):
        raise TypeError("amnesiac needs the forgotten training samples as a non-empty Split")
    if not torch.isin(forget_train.y, torch.tensor(sorted(forget_labels))).all():
        raise ValueError("forget_train holds samples of labels that are not being forgotten")
    keep = torch.tensor([c for c in range(retained.num_classes) if c not in retained.forgotten])
    gen = torch.Generator().manual_seed(seed)
    wrong = keep[torch.randint(len(keep), (len(forget_train),), generator=gen)]
    to_device(model, device)
    normalize = Normalizer(mean, std, device)
    x_r, y_r = _normalized(retained.train, normalize)
    x_f = normalize(forget_train.x.to(device))
    x, y = torch.cat([x_r, x_f]), torch.cat([y_r, wrong.to(device)])
    steps = max(cfg.min_steps, _epoch_steps(cfg.epochs, len(y), cfg.batch_size))
    opt = _sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    _fit(model, x, y, steps, opt, cfg.batch_size, seed, use_bf16(cfg.precision, device), cfg.augment, retained.flip)
    if info is not None:
        info["steps"] = steps
    return model


# --- UNSIR ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNSIRConfig:
    """Tarun et al.: per forget class, noise N maximising CE(M(N), class) - ... with an l2 penalty
    (Adam lr 0.1, lambda 0.1, as published), then impair (one epoch on the noise labelled with
    *its own* forget class, every image of each noise batch kept, plus a D_r subset, at a high lr)
    and repair (one epoch on the D_r subset). Unlike the public notebook: each noise batch carries
    its own class (not class 0) and all `noise_batch` images of it are used (not 3, one per colour
    channel). The notebook trains the model with Adam (0.02 / 0.01); we use SGD with momentum at
    the same two rates (`optimizer="adam"` restores Adam), like every other baseline here.

    The notebook's impair set is 20 copies of a 256-image noise batch per forget class beside
    1,000 images per retained class (one forgotten CIFAR-10 class: 36 % noise). Here the noise
    share of the impair set is `noise_fraction` whatever the sizes, so that a small or partial
    D_r is not swamped: the noise batch is repeated to reach it, split evenly over the classes.
    `min_steps` floors impair + repair together by lengthening the repair (training on D_r),
    for rows with UISPS's budget of steps; the impair step stays one pass over the noise."""

    noise_batch: int = 64
    noise_steps: int = 40  # the notebook's 5 epochs x 8 steps
    noise_lr: float = 0.1
    noise_l2: float = 0.1
    noise_fraction: float = 0.36  # share of noise in the impair set (the notebook's, one class)
    retain_per_class: int = 1000  # D_r subset per retained class (the notebook's 1000), capped
    impair_lr: float = 0.02
    repair_lr: float = 0.01
    impair_epochs: float = 1.0
    repair_epochs: float = 1.0
    min_steps: int = 0
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = False
    precision: str = "auto"


def error_maximising_noise(
    model: nn.Module, label: int, shape: tuple[int, ...], cfg: UNSIRConfig, seed: int, device: torch.device
) -> torch.Tensor:
    """Noise (normalised input space) that maximises the model's cross-entropy toward `label`."""
    gen = torch.Generator().manual_seed(seed * 1000 + label)
    noise = torch.randn((cfg.noise_batch, *shape), generator=gen).to(device).requires_grad_(True)
    target = torch.full((cfg.noise_batch,), label, device=device)
    opt = torch.optim.Adam([noise], lr=cfg.noise_lr)
    bf16 = use_bf16(cfg.precision, device)
    model.eval()
    for _ in range(cfg.noise_steps):
        with autocast(bf16, device):
            logits = model(noise)
        loss = -F.cross_entropy(logits.float(), target) + cfg.noise_l2 * noise.pow(2).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return noise.detach()


def unsir(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: UNSIRConfig = UNSIRConfig(),
    info: Info | None = None,
) -> nn.Module:
    require_retained(retained, forget_labels)
    if not 0 < cfg.noise_fraction < 1:
        raise ValueError("noise_fraction must be between 0 and 1")
    to_device(model, device)
    shape = tuple(retained.train.x.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for lab in retained.train.y.unique():
        idx = (retained.train.y == lab).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[: cfg.retain_per_class]])
    subset = retained.train.select(torch.cat(picks))
    x_r, y_r = _normalized(subset, Normalizer(mean, std, device))
    noise = [error_maximising_noise(model, lab, shape, cfg, seed, device) for lab in forget_labels]
    total = cfg.noise_fraction / (1 - cfg.noise_fraction) * len(y_r)
    repeats = max(1, round(total / (len(forget_labels) * cfg.noise_batch)))
    x_n = torch.cat([n.repeat(repeats, 1, 1, 1) for n in noise])
    y_n = torch.tensor(forget_labels, device=device).repeat_interleave(cfg.noise_batch * repeats)
    bf16 = use_bf16(cfg.precision, device)

    def optimiser(lr: float) -> torch.optim.Optimizer:
        if cfg.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        return _sgd(model, lr, cfg.momentum, cfg.weight_decay)

    x_i, y_i = torch.cat([x_n, x_r]), torch.cat([y_n, y_r])
    impair_steps = _epoch_steps(cfg.impair_epochs, len(y_i), cfg.batch_size)
    _fit(model, x_i, y_i, impair_steps, optimiser(cfg.impair_lr), cfg.batch_size, seed, bf16, cfg.augment, retained.flip)
    repair_steps = max(cfg.min_steps - impair_steps, _epoch_steps(cfg.repair_epochs, len(y_r), cfg.batch_size))
    _fit(model, x_r, y_r, repair_steps, optimiser(cfg.repair_lr), cfg.batch_size, seed + 1, bf16, cfg.augment, retained.flip)
    if info is not None:
        info.update(steps=impair_steps + repair_steps, noise_samples=len(y_n))
    return model


# --- Fisher forgetting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FisherForgettingConfig:
    """Golatkar et al. 2020 ("Eternal sunshine"), class forgetting as in their code: every
    parameter is resampled as theta + sqrt(var) * N(0, 1) with var = alpha / (F + 1e-8), clamped
    at 1e3 (1e2 for the output layer), averaged over dim 1 for weights of 2+ dims, times 10 for
    the output layer and for 1-d parameters (BatchNorm, biases). The forgotten classes' output
    rows are set to mean 0 with variance 1e-4 (before that x10). F is the Fisher diagonal on a
    stratified D_r subset (their code: all of D_r, one image at a time), with `labels`:
    "expected", the true Fisher their code computes (every class, weighted by the model's
    probability of it); "sampled", one label per image drawn from those probabilities (a
    one-sample estimate of it, whose noise the 1/F of the variance turns into a bias towards more
    noise: the estimator of this project's tables before 2026-12-07); "true", the image's own
    label (the empirical Fisher)."""

    alpha: float = 1e-6
    samples: int = 512
    labels: str = "expected"  # "expected" | "sampled" | "true"
    chunk: int = 16
    var_clamp: float = 1e3
    head_var_clamp: float = 1e2
    head_scale: float = 10.0
    vector_scale: float = 10.0
    forget_row_var: float = 1e-4

    def __post_init__(self) -> None:
        if self.labels not in ("expected", "sampled", "true"):
            raise ValueError(f"Fisher forgetting: labels must be expected, sampled or true, not {self.labels!r}")


def _head_names(model: nn.Module, num_classes: int) -> set[str]:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return {"head.weight", "head.bias"}
    # their heuristic for other models: parameters whose first dimension is the class count
    return {k for k, p in model.named_parameters() if p.shape[0] == num_classes}


def fisher_forgetting(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: FisherForgettingConfig = FisherForgettingConfig(),
    info: Info | None = None,
) -> nn.Module:
    require_retained(retained, forget_labels)
    to_device(model, device).eval()
    gen = torch.Generator().manual_seed(seed)
    subset = stratified_subset(retained.train, cfg.samples, gen)
    x, y = _normalized(subset, Normalizer(mean, std, device))
    if cfg.labels == "expected":
        fisher = expected_fisher_diagonal(model, x, retained.num_classes, cfg.chunk)
    else:
        if cfg.labels == "sampled":
            with torch.no_grad():
                probs = torch.cat([F.softmax(model(x[i : i + 256]).float(), 1) for i in range(0, len(x), 256)])
            y = torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(device)
        fisher = fisher_diagonal(model, x, y, cfg.chunk)
    heads = _head_names(model, retained.num_classes)
    forget = torch.tensor(sorted(forget_labels), device=device)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_head = name in heads
            var = (1.0 / (fisher[name] + 1e-8)).clamp(max=cfg.var_clamp)
            if is_head:
                var = var.clamp(max=cfg.head_var_clamp)
            var = cfg.alpha * var
            if p.ndim > 1:
                var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
            mu = p.detach().clone()
            if is_head:
                mu[forget] = 0.0
                var[forget] = cfg.forget_row_var
                var = var * cfg.head_scale
            elif p.ndim == 1:
                var = var * cfg.vector_scale
            noise = torch.randn(p.shape, generator=noise_gen, device=device, dtype=p.dtype)
            p.copy_(mu + var.sqrt() * noise)
    if info is not None:
        info["fisher_samples"] = len(y)
    return model


# --- Bad teacher (two-teacher distillation), zero-glance, with and without SPS -------------------


@dataclass(frozen=True)
class BadTeacherConfig:
    """Chundawat et al.: the student (a copy of the model) distils from the competent teacher
    (the original model) on retained samples and from an incompetent teacher (a randomly
    initialised model of the same architecture, seeded) on forget samples; KL at temperature T.
    Zero-glance: the forget side is the UISPS inversion D_g (core.inversion.invert), never D_f.

    The pass is the default UISPS pass's: one epoch of D_r floored at `min_steps` (350), batches
    of 128 with `synthetic_per_batch` samples of D_g cycling through, MaskedSGD (SGD, momentum 0.9)
    at the architecture's default unlearning rate (core.architectures.unlearning_lr) decaying on a
    cosine. So `bad_teacher` differs from the `uisps` row in its targets, with the same budget of
    steps, and in one more thing: the `uisps` default first re-initialises the forgotten classes'
    output rows (`reset_head`), which this pass never does. `sps=True` (App. D, Table VIII: freeze
    the SPS mask of eq. 12) changes nothing else. Their paper distils on a 30 % subset of D_r, about 117 steps on CIFAR-10's 45,000
    retained images; on a small data set 30 % is a handful of steps, so `retain_fraction` defaults
    to all of D_r.
    KL uses `batchmean`, which equals cross-entropy to the soft targets up to a constant, so the
    UISPS learning rates transfer."""

    inversion: InversionConfig | None = None  # None: InversionConfig() (UISPS's defaults)
    retain_fraction: float = 1.0
    epochs: float = 1.0
    min_steps: int = 350
    synthetic_per_batch: int = 16
    batch_size: int = 128
    lr: float | None = None  # None: the default pass's rate of the architecture (unlearning_lr)
    lr_schedule: str = "cosine"  # or "constant", as UnlearnConfig.lr_schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 1.0
    augment: bool = True
    sps: bool = False
    alpha: float = 1.5
    fisher_retain_size: int | None = None  # None: n_per_class per retained class, at most 2048
    fisher_chunk: int = 16
    precision: str = "auto"


def sps_mask(
    model: nn.Module,
    synthetic: Synthetic,
    retained: RetainedData,
    normalize: Normalizer,
    alpha: float,
    retain_size: int | None,
    chunk: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The SPS selection of core.uisps (eq. 9-12): Fisher on D_g and on a stratified D'_r."""
    device = normalize.mean.device
    n_per_class = max(1, len(synthetic.y) // max(1, len(synthetic.y.unique())))
    size = retain_size or min(2048, n_per_class * len(retained.train.y.unique()))
    subset = stratified_subset(retained.train, size, torch.Generator().manual_seed(seed))
    f_g = fisher_diagonal(model, synthetic.x, synthetic.y, chunk)
    f_r = fisher_diagonal(model, normalize(subset.x.to(device)), subset.y.to(device), chunk)
    return suppression_mask(f_r, f_g, alpha)


def bad_teacher(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: BadTeacherConfig = BadTeacherConfig(),
    synthetic: Synthetic | None = None,
    info: Info | None = None,
) -> nn.Module:
    """`synthetic`: a D_g inverted from this model (reused by a benchmark); else inverted here."""
    require_retained(retained, forget_labels)
    to_device(model, device).eval()
    normalize = Normalizer(mean, std, device)
    bf16 = use_bf16(cfg.precision, device)
    shape = tuple(retained.train.x.shape[1:])
    if synthetic is None:
        synthetic = invert(model, forget_labels, shape, cfg.inversion or InversionConfig(), seed, bf16)
    competent = copy.deepcopy(model).eval()
    incompetent = random_model(arch, shape[0], retained.num_classes, seed, device)
    frozen = sps_mask(model, synthetic, retained, normalize, cfg.alpha, cfg.fisher_retain_size,
                      cfg.fisher_chunk, seed) if cfg.sps else {}
    gen = torch.Generator().manual_seed(seed)
    n_sub = max(1, round(cfg.retain_fraction * len(retained.train)))
    subset = retained.train.select(torch.randperm(len(retained.train), generator=gen)[:n_sub])
    x_r = normalize(subset.x.to(device))
    n_g = len(synthetic.y)
    k = min(cfg.synthetic_per_batch, n_g)
    shuffle = Shuffler(len(x_r), cfg.batch_size - k, seed, device)
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * len(x_r) / cfg.batch_size))  # as core.uisps.resolve_steps
    syn_perm = torch.randperm(n_g, generator=gen).to(device)
    syn_offsets = torch.arange(k, device=device)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', not {cfg.lr_schedule!r}")
    lr = cfg.lr or unlearning_lr(arch)
    opt = MaskedSGD(model, frozen, lr, cfg.momentum, cfg.weight_decay)
    t = cfg.temperature
    with torch.no_grad(), autocast(bf16, device):
        bad_targets = F.softmax(incompetent(synthetic.x).float() / t, dim=1)
    model.train()
    with seeded_randomness(seed, device):  # dropout, in the models that have it
        for step in range(steps):
            real = x_r[shuffle()]
            if cfg.augment:
                real = augment(real, retained.flip, aug_gen)
            syn = syn_perm[(syn_offsets + step * k) % n_g]
            opt.set_lr(scheduled_lr(cfg.lr_schedule, lr, step, steps))
            with torch.no_grad(), autocast(bf16, device):
                good_targets = F.softmax(competent(real).float() / t, dim=1)
            with autocast(bf16, device):
                logits = model(torch.cat([real, synthetic.x[syn]]))
            targets = torch.cat([good_targets, bad_targets[syn]])
            loss = F.kl_div(F.log_softmax(logits.float() / t, dim=1), targets, reduction="batchmean")
            opt.step(loss)
    model.eval()
    if info is not None:
        info.update(steps=steps, frozen_fraction=frozen_fraction(frozen) if frozen else 0.0)
    return model


def bad_teacher_sps(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: BadTeacherConfig = BadTeacherConfig(),
    synthetic: Synthetic | None = None,
    info: Info | None = None,
) -> nn.Module:
    """`bad_teacher` with selective parameter suppression (paper App. D)."""
    from dataclasses import replace

    return bad_teacher(model, arch, retained, forget_labels, mean, std, device, seed,
                       replace(cfg, sps=True), synthetic, info)


# --- Head mask (a control) -----------------------------------------------------------------------


class HeadMasked(nn.Module):
    """The wrapped model with the forgotten classes' logits forced to -inf. No weight changes:
    A_Df is 0 by construction while the features still separate the class (the probe shows it).
    `features` is the wrapped model's; `wrapped` is what someone holding the weights fine-tunes."""

    def __init__(self, wrapped: nn.Module, forget_labels: list[int], num_classes: int) -> None:
        super().__init__()
        self.wrapped = wrapped
        mask = torch.zeros(num_classes)
        mask[sorted(forget_labels)] = float("-inf")
        self.register_buffer("logit_mask", mask)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return penultimate_features(self.wrapped, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x) + self.logit_mask


def head_mask(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    info: Info | None = None,
) -> nn.Module:
    require_retained(retained, forget_labels)
    return HeadMasked(model, forget_labels, retained.num_classes).to(device).eval()


# --- UISPS ---------------------------------------------------------------------------------------


def uisps(
    model: nn.Module,
    arch: str,
    retained: RetainedData,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int,
    cfg: UnlearnConfig | None = None,
    synthetic: Synthetic | None = None,
    info: Info | None = None,
) -> nn.Module:
    """core.uisps.run_uisps with `seed` as its seed (inversion, D'_r, relabel model, batches)."""
    require_retained(retained, forget_labels)
    cfg = (cfg or UnlearnConfig()).model_copy(update={"seed": seed})
    outcome = run_uisps(model, arch, retained, forget_labels, mean, std, cfg, device, synthetic=synthetic)
    if info is not None:
        info.update(steps=outcome.steps, frozen_fraction=outcome.frozen_fraction, timings=outcome.timings,
                    epochs_equivalent=outcome.epochs_equivalent)
    return outcome.model


# --- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., nn.Module]
    zero_glance: bool  # reads no forgotten sample
    needs_forget_data: bool = False  # takes `forget_train` (the forgotten classes' training split)
    uses_inversion: bool = False  # takes `synthetic` (a D_g inverted from the model)
    trains_from_scratch: bool = False


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("retrain", retrain, zero_glance=True, trains_from_scratch=True),
        MethodSpec("finetune", finetune, zero_glance=True),
        MethodSpec("amnesiac", amnesiac, zero_glance=False, needs_forget_data=True),
        MethodSpec("unsir", unsir, zero_glance=True),
        MethodSpec("fisher", fisher_forgetting, zero_glance=True),
        MethodSpec("bad_teacher", bad_teacher, zero_glance=True, uses_inversion=True),
        MethodSpec("bad_teacher_sps", bad_teacher_sps, zero_glance=True, uses_inversion=True),
        MethodSpec("head_mask", head_mask, zero_glance=True),
        MethodSpec("uisps", uisps, zero_glance=True, uses_inversion=True),
    ]
}
