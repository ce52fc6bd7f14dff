"""The audit metrics: A_Dr, A_Df, the entropy MIA and the prediction histogram, on a model whose
every answer is known in advance."""

from __future__ import annotations

import torch

from core.data import Dataset, Split
from core.metrics import evaluate, mia_score

CLASSES = 5
PER_CLASS = 10


class KnownAnswers(torch.nn.Module):
    """Reads the label from pixel 0 and answers it, but calls class 2 class 0. Pixel 1 says how
    sure it is: sharp logits (low entropy) where it is set, as a model is on what it was trained
    on, and flat ones where it is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 255 / 20).round()
        label = torch.where(label == 2, torch.zeros_like(label), label)
        sharpness = torch.where(x[:, 0, 0, 1] > 0.5, 10.0, 0.05).unsqueeze(1)
        return -sharpness * (label.unsqueeze(1) - torch.arange(CLASSES)).square()


def _split(sure: dict[int, bool]) -> Split:
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x = torch.zeros(len(labels), 1, 1, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = (labels * 20).to(torch.uint8)
    x[:, 0, 0, 1] = torch.tensor([255 if sure[int(label)] else 0 for label in labels], dtype=torch.uint8)
    return Split(x, labels)


def _dataset(forgotten_train_sure: bool) -> Dataset:
    # training samples of the retained classes are "members" (sure), test samples are not; the
    # forgotten class 4's training samples are as the test asks
    train = _split({c: c != 4 or forgotten_train_sure for c in range(CLASSES)})
    test = _split(dict.fromkeys(range(CLASSES), False))
    return Dataset("known", train, test, [str(c) for c in range(CLASSES)], flip=False)


def _evaluate(dataset: Dataset, ignore: list[int] = ()):  # noqa: ANN202
    return evaluate(KnownAnswers(), dataset, [4], [0.0], [1.0], torch.device("cpu"), ignore_labels=ignore)


def test_accuracies_count_the_retained_and_the_forgotten_test_samples_apart() -> None:
    result = _evaluate(_dataset(forgotten_train_sure=True))

    assert result.acc_retain == 75.0  # classes 0, 1, 3 right, class 2 wrong
    assert result.acc_forget == 100.0
    assert result.forget_histogram == [0, 0, 0, 0, PER_CLASS]


def test_labels_forgotten_before_count_in_neither_accuracy() -> None:
    result = _evaluate(_dataset(forgotten_train_sure=True), ignore=[2])

    assert result.acc_retain == 100.0 and result.acc_forget == 100.0


def test_the_mia_calls_forgotten_samples_members_only_where_the_model_still_knows_them() -> None:
    remembered = _evaluate(_dataset(forgotten_train_sure=True))
    forgotten = _evaluate(_dataset(forgotten_train_sure=False))

    assert remembered.mia == 100.0  # as sure as on its training data: members
    assert forgotten.mia == 0.0  # as unsure as on unseen data: not members


def test_the_mia_score_is_the_share_of_targets_that_look_like_members() -> None:
    sharp = torch.tensor([[10.0, 0.0, 0.0]]).repeat(20, 1)
    flat = torch.tensor([[0.1, 0.0, 0.0]]).repeat(20, 1)

    assert mia_score(sharp, flat, torch.cat([sharp[:3], flat[:1]])) == 75.0


class Sureness(torch.nn.Module):
    """Answers the label in pixel 0, as sure as pixel 1 says (on a continuous scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, 0, 0, 0] * 255 / 20).round()
        sharpness = 0.05 + 10 * x[:, 0, 0, 1].unsqueeze(1)
        return -sharpness * (label.unsqueeze(1) - torch.arange(CLASSES)).square()


def test_the_mia_takes_its_members_from_the_samples_the_model_was_trained_on() -> None:
    # a Retrain on a fifth of D_r: sure on that fifth, unsure on the rest of D_r (never seen) and on
    # the test split; the forgotten class's training samples are barely surer than unseen ones
    retained = torch.arange(4).repeat_interleave(PER_CLASS)
    labels = torch.cat([retained, torch.full((PER_CLASS,), 4)])
    seen = torch.cat([torch.arange(len(retained)) % 5 == 0, torch.zeros(PER_CLASS, dtype=torch.bool)])
    x = torch.zeros(len(labels), 1, 1, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = (labels * 20).to(torch.uint8)
    train = Split(x.clone(), labels)
    train.x[:, 0, 0, 1] = torch.where(seen, 255, 0)
    train.x[labels == 4, 0, 0, 1] = 10
    dataset = Dataset("known", train, Split(x, labels), [str(c) for c in range(CLASSES)], flip=False)

    def mia(members: Split | None) -> float | None:
        return evaluate(Sureness(), dataset, [4], [0.0], [1.0], torch.device("cpu"), members=members).mia

    assert mia(train.select(seen)) == 0.0  # against what it was trained on, they look unseen
    assert mia(None) == 100.0  # the unseen part of D_r taught as members drags the attack along
