"""The unlearning pass: frozen elements, relabel reproducibility, zero-glance, end to end."""

import pytest
import torch

from core.config import InversionConfig, UnlearnConfig
from core.data import retained_data
from core.device import Normalizer
from core.uisps import random_model_soft_labels, run_uisps, stratified_subset, unlearning_pass

FAST = UnlearnConfig(inversion=InversionConfig(iterations=200), precision="fp32")


def test_suppressed_elements_are_bit_identical_after_the_pass_with_momentum_and_weight_decay(trained_digits, digits_copy):
    ds = trained_digits.dataset
    original = {k: v.clone() for k, v in digits_copy.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    frozen = {k: torch.rand(v.shape, generator=gen) < 0.5 for k, v in original.items()}
    syn_x = torch.randn(8, 1, 8, 8)
    soft = torch.softmax(torch.randn(8, 10), 1)
    cfg = FAST.model_copy(update={"momentum": 0.9, "weight_decay": 5e-2, "steps": 15})
    norm = Normalizer(trained_digits.manifest.mean, trained_digits.manifest.std, torch.device("cpu"))
    unlearning_pass(digits_copy, retained_data(ds, [3]), syn_x, soft, frozen, norm, cfg, lr=0.1)
    for k, p in digits_copy.named_parameters():
        assert torch.equal(p[frozen[k]], original[k][frozen[k]]), k
        assert not torch.equal(p[~frozen[k]], original[k][~frozen[k]]), k  # the rest did move


def test_relabel_is_reproducible_from_its_seed_and_differs_across_seeds():
    x = torch.randn(5, 1, 8, 8)
    a = random_model_soft_labels("smallcnn", 1, 10, x, seed=7)
    b = random_model_soft_labels("smallcnn", 1, 10, x, seed=7)
    c = random_model_soft_labels("smallcnn", 1, 10, x, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.sum(1), torch.ones(5))


def test_relabel_leaves_the_global_random_state_alone():
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    random_model_soft_labels("smallcnn", 1, 10, torch.zeros(2, 1, 8, 8), seed=0)
    assert torch.equal(torch.rand(1), expected)


def test_stratified_subset_has_every_retained_label_equally(trained_digits):
    split = retained_data(trained_digits.dataset, [0]).train
    sub = stratified_subset(split, 90, torch.Generator().manual_seed(0))
    counts = torch.bincount(sub.y, minlength=10)
    assert counts[0] == 0 and (counts[1:] == 10).all()


def test_retained_data_holds_no_forgotten_sample(trained_digits):
    retained = retained_data(trained_digits.dataset, [2, 9])
    assert not torch.isin(retained.train.y, torch.tensor([2, 9])).any()
    assert len(retained.train) == len(trained_digits.dataset.train) - int(
        torch.isin(trained_digits.dataset.train.y, torch.tensor([2, 9])).sum())


def test_run_uisps_refuses_retained_data_that_still_has_the_forget_label(trained_digits, digits_copy):
    m = trained_digits.manifest
    with pytest.raises(ValueError, match="exclude"):
        run_uisps(digits_copy, "smallcnn", retained_data(trained_digits.dataset, [1]), [3],
                  m.mean, m.std, FAST, torch.device("cpu"))


def test_uisps_forgets_a_digit_and_keeps_the_rest(trained_digits, digits_copy):
    from core.workflow import unlearn_model

    result = unlearn_model(digits_copy, trained_digits.manifest, trained_digits.dataset, [3], FAST, torch.device("cpu"))
    before, after = result.report["before"], result.report["after"]
    assert before["acc_forget"] > 90
    assert after["acc_forget"] <= 1.0
    assert after["acc_retain"] >= before["acc_retain"] - 3.0
    assert 0 < result.report["frozen_fraction"] < 1
    assert result.manifest.forgotten_labels == [3]
    assert set(result.report["timings"]) == {"inversion", "fisher", "relabel", "unlearning", "evaluation"}
