"""Evaluation (paper Sec. V-A, App. H): A_Dr, A_Df, MIA, prediction histogram.

Forgotten samples are read here to *evaluate* a model, never by an unlearning method.

MIA, as in Chundawat et al. (bad teacher), made explicit:
- feature: the entropy of the model's softmax output, one number per sample;
- attack: logistic regression with balanced class weights, trained on retained-class *training*
  samples (label 1, member) against retained-class *test* samples (label 0, non-member);
- score: percent of the forgotten classes' *training* samples that the attack calls members.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from core.data import Dataset, Split
from core.device import Normalizer, predict_logits
from core.inversion import entropy

MIA_DEFINITION = (
    "feature: softmax entropy; attack: logistic regression (balanced class weights) trained on "
    "retained-class training samples (member=1) vs retained-class test samples (member=0); "
    "score: % of forgotten-class training samples predicted member"
)


@dataclass
class Evaluation:
    acc_retain: float  # percent, test split, retained classes
    acc_forget: float | None  # percent, test split, forgotten classes (None: nothing forgotten, or no such sample)
    mia: float | None  # percent of forgotten training samples called "member" (None: likewise)
    forget_histogram: list[int]  # predicted-class counts on forgotten test samples ([]: none)

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1).cpu() == y.cpu()).float().mean().item() if len(y) else float("nan")


def mia_score(member: torch.Tensor, nonmember: torch.Tensor, target: torch.Tensor, seed: int = 0) -> float:
    """Train the entropy attack on member vs non-member logits; % of `target` called member."""
    x = torch.cat([entropy(member), entropy(nonmember)]).cpu().numpy().reshape(-1, 1)
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    attack = LogisticRegression(class_weight="balanced", random_state=seed).fit(x, y)
    pred = attack.predict(entropy(target).cpu().numpy().reshape(-1, 1))
    return 100.0 * float(pred.mean())


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    forget_labels: list[int],
    mean: list[float],
    std: list[float],
    device: torch.device,
    ignore_labels: list[int] = (),  # type: ignore[assignment]
    members: Split | None = None,
) -> Evaluation:
    """`ignore_labels` (forgotten by an earlier version) count in neither A_Dr nor A_Df.
    `members`: the retained-class training samples the model was trained on, the MIA's members
    (default: all of them; a model trained on part of D_r never saw the rest)."""
    normalize = Normalizer(mean, std, device)
    gone = set(forget_labels) | set(ignore_labels)
    test_r = dataset.test.without_labels(gone)
    test_f = dataset.test.with_labels(forget_labels)
    logits_r = predict_logits(model, test_r.x, normalize)
    acc_r = accuracy(logits_r, test_r.y)
    if not forget_labels:
        return Evaluation(acc_r, None, None, [])
    # A data source whose owner already deleted the forgotten samples (the case zero-glance
    # unlearning is for) has none of them to measure: those figures are None, not an error.
    acc_f, hist = None, []
    if len(test_f):
        logits_f = predict_logits(model, test_f.x, normalize)
        acc_f = accuracy(logits_f, test_f.y)
        hist = torch.bincount(logits_f.argmax(1).cpu(), minlength=dataset.num_classes).tolist()
    train_f = dataset.train.with_labels(forget_labels)
    if not len(train_f):
        return Evaluation(acc_r, acc_f, None, hist)
    train_r = members if members is not None else dataset.train.without_labels(gone)
    # as many members as non-members, picked by a fixed seed, so the attack is not skewed by size
    pick = torch.randperm(len(train_r), generator=torch.Generator().manual_seed(0))[: len(test_r)]
    mia = mia_score(
        predict_logits(model, train_r.x[pick], normalize),
        logits_r,
        predict_logits(model, train_f.x, normalize),
    )
    return Evaluation(acc_r, acc_f, mia, hist)
