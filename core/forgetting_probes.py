"""Does the knowledge survive below the output? Two probes beyond A_Df and MIA.

Both read forgotten samples of the *test* split, to evaluate a model only; no unlearning method
ever sees them.

- **Feature probe**: a logistic regression on the penultimate features (`model.features(x)`)
  telling the forgotten classes (1) from the rest (0). The test split is cut in two halves,
  stratified by class and seeded; the probe (standardised features, balanced class weights) is
  fitted on one half and scored on the other. Reported: accuracy (%) and balanced accuracy (%)
  (with one forgotten class in ten, always answering "rest" scores 90 % accuracy but 50 %
  balanced). A model whose output merely hides a class (`head_mask`) keeps its probe accuracy.
- **Relearn time**: optimiser steps of fine-tuning until A_Df, on held-out forgotten test
  samples, passes a threshold (50 %). The forgotten test samples of each class are cut in two
  halves (seeded): `per_class` samples of one half are the fine-tuning set, the other half is
  scored. By default the fine-tuning batch also holds as many retained-class test samples (from
  the retained test split's first half), so that "predict the forgotten class for everything"
  is not a shortcut. Full-batch SGD at a fixed lr, BatchNorm in eval mode (running statistics
  fixed: only weights move). Capped at `max_steps`; the cap is reported when not reached.
  A `HeadMasked` model is fine-tuned without its mask: the mask is not a weight, and whoever
  holds the checkpoint can drop it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import penultimate_features
from core.data import Split
from core.device import Normalizer, autocast, use_bf16


@dataclass(frozen=True)
class ProbeConfig:
    max_iter: int = 2000
    C: float = 1.0


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # percent, held-out half of the test split
    balanced_accuracy: float  # percent


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, normalize: Normalizer, batch_size: int = 512) -> torch.Tensor:
    device = normalize.mean.device
    model.eval()
    out = [penultimate_features(model, normalize(x[i : i + batch_size].to(device))).float()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def feature_probe(
    model: nn.Module,
    test: Split,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int = 0,
    cfg: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = features(model, test.x, Normalizer(mean, std, device)).cpu().numpy()
    labels = test.y.numpy()
    target = np.isin(labels, forget_labels).astype(int)
    f_fit, f_score, t_fit, t_score = train_test_split(
        feats, target, test_size=0.5, stratify=labels, random_state=seed
    )
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=cfg.max_iter, C=cfg.C, random_state=seed),
    ).fit(f_fit, t_fit)
    pred = probe.predict(f_score)
    return ProbeResult(100.0 * float((pred == t_score).mean()), 100.0 * float(balanced_accuracy_score(t_score, pred)))


@dataclass(frozen=True)
class RelearnConfig:
    per_class: int = 16  # fine-tuning samples per forgotten class (from one half of its test samples)
    lr: float = 0.01
    momentum: float = 0.9
    max_steps: int = 200
    threshold: float = 50.0  # percent A_Df on the other half
    mix_retained: bool = True  # as many retained-class test samples in the fine-tuning batch
    check_every: int = 10  # host synchronisations: the first passing step is still exact
    precision: str = "auto"


@dataclass(frozen=True)
class RelearnResult:
    steps: int  # first step after which A_Df > threshold (0: already above), or max_steps
    reached: bool
    acc_forget_start: float
    acc_forget_end: float


def _halves(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = idx[torch.randperm(len(idx), generator=gen)]
    half = len(idx) // 2
    return idx[:half], idx[half:]


def relearn_split(test: Split, forget_labels: list[int], cfg: RelearnConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into `test`: the fine-tuning set and the scored forgotten samples (disjoint)."""
    gen = torch.Generator().manual_seed(seed)
    tune, score = [], []
    for lab in sorted(forget_labels):
        first, second = _halves((test.y == lab).nonzero().flatten(), gen)
        tune.append(first[: cfg.per_class])
        score.append(second)
    if cfg.mix_retained:
        rest = (~torch.isin(test.y, torch.tensor(sorted(forget_labels)))).nonzero().flatten()
        first, _ = _halves(rest, gen)
        tune.append(first[: cfg.per_class * len(forget_labels)])
    return torch.cat(tune), torch.cat(score)


def relearn_steps(
    model: nn.Module,
    test: Split,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    seed: int = 0,
    cfg: RelearnConfig = RelearnConfig(),
) -> RelearnResult:
    """Fine-tune a copy of `model` (the caller's is untouched) and count steps to relearn."""
    model = copy.deepcopy(getattr(model, "wrapped", model)).to(device)
    normalize = Normalizer(mean, std, device)
    tune, score = relearn_split(test, forget_labels, cfg, seed)
    x_t, y_t = normalize(test.x[tune].to(device)), test.y[tune].to(device)
    x_s, y_s = normalize(test.x[score].to(device)), test.y[score].to(device)
    bf16 = use_bf16(cfg.precision, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    model.eval()  # BatchNorm statistics stay fixed; only the weights are fine-tuned

    def acc() -> torch.Tensor:
        with torch.no_grad(), autocast(bf16, device):
            return (model(x_s).argmax(1) == y_s).float().mean() * 100.0

    curve = torch.empty(cfg.max_steps + 1, device=device)
    curve[0] = acc()
    passed = None
    done = 0
    for step in range(1, cfg.max_steps + 1):
        if step == 1 or (step - 1) % cfg.check_every == 0:
            above = (curve[:step] > cfg.threshold).nonzero()
            if len(above):
                passed = int(above[0])
                break
        with autocast(bf16, device):
            logits = model(x_t)
        loss = F.cross_entropy(logits.float(), y_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve[step] = acc()
        done = step
    if passed is None:
        above = (curve[: done + 1] > cfg.threshold).nonzero()
        passed = int(above[0]) if len(above) else None
    values = curve[: done + 1].cpu()
    if passed is None:
        return RelearnResult(cfg.max_steps, False, float(values[0]), float(values[-1]))
    return RelearnResult(passed, True, float(values[0]), float(values[passed]))
