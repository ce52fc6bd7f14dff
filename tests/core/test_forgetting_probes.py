"""Feature probe and relearn time: what a model still knows about a class below its output."""

import pytest
import torch

from core import baselines as B
from core.config import TrainConfig
from core.data import retained_data
from core.forgetting_probes import RelearnConfig, feature_probe, relearn_split, relearn_steps

CPU = torch.device("cpu")
FORGET = [3]


@pytest.fixture(scope="module")
def retrained(trained_digits):
    """Retrain: the same recipe as the fixture's Original, without class 3."""
    m = trained_digits.manifest
    return B.retrain(None, "smallcnn", retained_data(trained_digits.dataset, FORGET), FORGET, m.mean, m.std, CPU, 0,
                     TrainConfig(epochs=15, lr=0.1, precision="fp32"))


def test_relearn_is_immediate_for_the_original_and_takes_steps_for_retrain(trained_digits, retrained):
    ds, m = trained_digits.dataset, trained_digits.manifest
    cfg = RelearnConfig(precision="fp32")
    original = relearn_steps(trained_digits.model, ds.test, FORGET, m.mean, m.std, CPU, 0, cfg)
    retrain = relearn_steps(retrained, ds.test, FORGET, m.mean, m.std, CPU, 0, cfg)
    assert original.reached and original.steps == 0 and original.acc_forget_start > 90
    assert retrain.acc_forget_start == 0.0
    assert retrain.steps > original.steps
    assert not retrain.reached or retrain.acc_forget_end > cfg.threshold


def test_relearn_reports_the_cap_when_the_threshold_is_not_reached(trained_digits, retrained):
    ds, m = trained_digits.dataset, trained_digits.manifest
    cfg = RelearnConfig(lr=1e-6, max_steps=7, check_every=3, precision="fp32")
    result = relearn_steps(retrained, ds.test, FORGET, m.mean, m.std, CPU, 0, cfg)
    assert result.steps == 7 and not result.reached


def test_relearn_fine_tunes_a_copy(trained_digits):
    ds, m = trained_digits.dataset, trained_digits.manifest
    before = {k: v.clone() for k, v in trained_digits.model.state_dict().items()}
    relearn_steps(trained_digits.model, ds.test, [3, 5], m.mean, m.std, CPU, 0,
                  RelearnConfig(threshold=101.0, max_steps=3, precision="fp32"))
    assert all(torch.equal(before[k], v) for k, v in trained_digits.model.state_dict().items())


def test_relearn_tunes_and_scores_on_disjoint_test_samples(trained_digits):
    test = trained_digits.dataset.test
    cfg = RelearnConfig(per_class=16)
    tune, score = relearn_split(test, [3, 5], cfg, seed=0)
    assert not set(tune.tolist()) & set(score.tolist())
    assert (torch.bincount(test.y[tune], minlength=10)[[3, 5]] == 16).all()
    assert torch.isin(test.y[score], torch.tensor([3, 5])).all()
    # as many retained-class samples as forgotten ones in the fine-tuning batch
    assert int((~torch.isin(test.y[tune], torch.tensor([3, 5]))).sum()) == 32


def test_feature_probe_finds_a_learned_class_and_is_reproducible(trained_digits, retrained):
    ds, m = trained_digits.dataset, trained_digits.manifest
    a = feature_probe(trained_digits.model, ds.test, FORGET, m.mean, m.std, CPU, seed=0)
    b = feature_probe(trained_digits.model, ds.test, FORGET, m.mean, m.std, CPU, seed=0)
    assert a == b and a.balanced_accuracy > 95 and a.accuracy > 95
    # a model that never saw the class still separates it somewhat (features generalise), less well
    r = feature_probe(retrained, ds.test, FORGET, m.mean, m.std, CPU, seed=0)
    assert 50 < r.balanced_accuracy <= a.balanced_accuracy
