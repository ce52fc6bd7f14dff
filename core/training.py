"""Supervised training: makes original models and the Retrain reference (same loop for both)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import TrainConfig
from core.data import Split
from core.device import Normalizer, augment, autocast, batches, seeded_randomness, use_bf16
from core.progress import ProgressFn, no_progress


def train(
    model: nn.Module,
    data: Split,
    normalize: Normalizer,
    config: TrainConfig,
    flip: bool,
    progress: ProgressFn = no_progress,
) -> nn.Module:
    """SGD with Nesterov momentum and a one-cycle (linear warm-up, cosine down) schedule."""
    device = normalize.mean.device
    # channels_last: cuDNN's fastest convolutions; oneDNN's CPU training steps are a little faster too
    model.to(device, memory_format=torch.channels_last).train()
    x, y = data.x.to(device), data.y.to(device)
    gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator(device=device).manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(y) / config.batch_size)
    total = steps_per_epoch * config.epochs
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, nesterov=config.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.15)
    bf16 = use_bf16(config.precision, device)
    step = 0
    with seeded_randomness(config.seed, device):  # dropout, in the models that have it
        for _ in range(config.epochs):
            for idx in batches(len(y), config.batch_size, gen, device):
                if len(idx) < 2:  # BatchNorm cannot train on a single sample
                    continue
                inputs = normalize(x[idx])
                if config.augment:
                    inputs = augment(inputs, flip, aug_gen)
                with autocast(bf16, device):
                    loss = F.cross_entropy(model(inputs), y[idx], label_smoothing=config.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                progress("training", step, total)
    return model.eval()
