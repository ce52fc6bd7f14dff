"""The unlearning baselines of the benchmark: each runs, changes the model, and keeps its contract."""

import copy
import inspect
from dataclasses import replace

import pytest
import torch

from core import baselines as B
from core.config import InversionConfig, TrainConfig, UnlearnConfig
from core.data import RetainedData, retained_data
from core.device import Normalizer, predict_logits
from core.forgetting_probes import feature_probe
from core.metrics import evaluate

CPU = torch.device("cpu")
FORGET = [3, 5]
TINY_INVERSION = InversionConfig(iterations=20, n_per_class=8)


def tiny_kwargs(name: str, dataset) -> dict:
    """Small, fp32 settings: every method in seconds on digits."""
    return {
        "retrain": {"cfg": TrainConfig(epochs=2, lr=0.1, precision="fp32")},
        "finetune": {"cfg": B.FinetuneConfig(epochs=1, precision="fp32")},
        "amnesiac": {"cfg": B.AmnesiacConfig(precision="fp32"), "forget_train": dataset.train.with_labels(FORGET)},
        "unsir": {"cfg": B.UNSIRConfig(noise_steps=5, precision="fp32")},
        "fisher": {"cfg": B.FisherForgettingConfig(samples=64)},
        "bad_teacher": {"cfg": B.BadTeacherConfig(inversion=TINY_INVERSION, min_steps=5, precision="fp32")},
        "bad_teacher_sps": {"cfg": B.BadTeacherConfig(inversion=TINY_INVERSION, min_steps=5, precision="fp32")},
        "head_mask": {},
        "uisps": {"cfg": UnlearnConfig(inversion=TINY_INVERSION, steps=5, precision="fp32")},
    }[name]


@pytest.mark.parametrize("name", list(B.METHODS))
def test_every_baseline_runs_on_digits_and_changes_the_model(trained_digits, digits_copy, name):
    ds, m = trained_digits.dataset, trained_digits.manifest
    spec = B.METHODS[name]
    info: dict = {}
    before = {k: v.clone() for k, v in digits_copy.state_dict().items()}
    out = spec.fn(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                  info=info, **tiny_kwargs(name, ds))
    norm = Normalizer(m.mean, m.std, CPU)
    original_logits = predict_logits(trained_digits.model, ds.test.x[:64], norm)
    new_logits = predict_logits(out, ds.test.x[:64], norm)
    assert not torch.equal(new_logits, original_logits)
    if name != "head_mask":
        assert torch.isfinite(new_logits).all()
        if spec.trains_from_scratch:
            assert out is not digits_copy  # a new model, not the original's weights changed
        else:
            assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items() if k in before)
    if name in ("bad_teacher_sps", "uisps"):
        assert 0 < info["frozen_fraction"] < 1
    if name == "bad_teacher":
        assert info["frozen_fraction"] == 0.0


@pytest.mark.parametrize("name", [n for n, s in B.METHODS.items() if s.zero_glance])
def test_zero_glance_methods_refuse_anything_but_retained_data(trained_digits, digits_copy, name):
    ds, m = trained_digits.dataset, trained_digits.manifest
    kwargs = tiny_kwargs(name, ds)
    for wrong in (ds, ds.train):
        with pytest.raises(TypeError, match="RetainedData"):
            B.METHODS[name].fn(digits_copy, "smallcnn", wrong, FORGET, m.mean, m.std, CPU, 0, **kwargs)
    with pytest.raises(ValueError, match="exclude"):  # retained data that still holds a forget label
        B.METHODS[name].fn(digits_copy, "smallcnn", retained_data(ds, [3]), FORGET, m.mean, m.std, CPU, 0, **kwargs)


def test_only_amnesiac_takes_forgotten_data_and_says_so():
    for name, spec in B.METHODS.items():
        params = inspect.signature(spec.fn).parameters
        assert params["retained"].annotation == "RetainedData", name
        data_params = [p for p, v in params.items() if "Split" in str(v.annotation) or "Dataset" in str(v.annotation)]
        if spec.needs_forget_data:
            assert not spec.zero_glance and data_params == ["forget_train"], name
        else:
            assert data_params == [], name
    assert [n for n, s in B.METHODS.items() if not s.zero_glance] == ["amnesiac"]


def test_retained_data_cannot_carry_a_forgotten_sample(trained_digits):
    ds = trained_digits.dataset
    with pytest.raises(AssertionError, match="forgotten label"):
        RetainedData(train=ds.train, forgotten=frozenset(FORGET), num_classes=10, flip=False)


def test_amnesiac_refuses_forget_samples_of_other_labels(trained_digits, digits_copy):
    ds, m = trained_digits.dataset, trained_digits.manifest
    with pytest.raises(ValueError, match="not being forgotten"):
        B.amnesiac(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                   forget_train=ds.train.with_labels([1, 3]))


def test_unsir_labels_each_noise_batch_with_its_own_class_and_keeps_every_image(trained_digits, digits_copy, monkeypatch):
    """Not the public notebook's bugs: all noise labelled 0, and 3 images kept per noise batch."""
    ds, m = trained_digits.dataset, trained_digits.manifest
    calls = []
    real_fit = B._fit
    monkeypatch.setattr(B, "_fit", lambda model, x, y, *a, **k: calls.append(y.clone()) or real_fit(model, x, y, *a, **k))
    cfg = B.UNSIRConfig(noise_steps=3, noise_batch=32, precision="fp32")
    retained = retained_data(ds, FORGET)
    B.unsir(digits_copy, "smallcnn", retained, FORGET, m.mean, m.std, CPU, 0, cfg)
    impair, repair = calls
    counts = torch.bincount(impair, minlength=10)
    n_retained = len(impair) - int(counts[FORGET].sum())
    assert counts[3] == counts[5] and counts[3] % cfg.noise_batch == 0 and counts[3] >= cfg.noise_batch
    assert counts[FORGET].sum() / len(impair) == pytest.approx(cfg.noise_fraction, abs=0.05)
    assert len(repair) == n_retained and not torch.isin(repair, torch.tensor(FORGET)).any()


def test_fisher_forgetting_silences_the_forgotten_output_rows(trained_digits, digits_copy):
    ds, m = trained_digits.dataset, trained_digits.manifest
    out = B.fisher_forgetting(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                              B.FisherForgettingConfig(samples=64))
    before = trained_digits.model.head.weight[FORGET].abs().mean()
    # mean 0, variance 1e-4 x 10: the rows lose what they held
    assert out.head.weight[FORGET].abs().mean() < 0.1 < before


def test_fisher_forgetting_takes_the_true_fisher_over_every_class_by_default(trained_digits, digits_copy, monkeypatch):
    ds, m = trained_digits.dataset, trained_digits.manifest
    calls = []
    real = B.expected_fisher_diagonal

    def recorded(model, x, num_classes, chunk=16):
        calls.append((len(x), num_classes))
        return real(model, x, num_classes, chunk)

    monkeypatch.setattr(B, "expected_fisher_diagonal", recorded)
    B.fisher_forgetting(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                        B.FisherForgettingConfig(samples=64))
    assert calls == [(64, 10)]


def test_fisher_forgetting_refuses_an_unknown_kind_of_labels():
    with pytest.raises(ValueError, match="expected, sampled or true"):
        B.FisherForgettingConfig(labels="expectation")


def test_head_mask_hides_the_class_but_its_features_still_know_it(trained_digits, digits_copy):
    """The control: A_Df = 0 by construction, while a linear probe finds the class as before."""
    ds, m = trained_digits.dataset, trained_digits.manifest
    masked = B.head_mask(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0)
    assert evaluate(masked, ds, FORGET, m.mean, m.std, CPU).acc_forget == 0.0
    # every prediction the original made outside the forgotten classes stands; only those that
    # named a forgotten class move (for a retained sample such a move can only fix an error)
    norm = Normalizer(m.mean, m.std, CPU)
    before = predict_logits(trained_digits.model, ds.test.x, norm).argmax(1)
    after = predict_logits(masked, ds.test.x, norm).argmax(1)
    kept = ~torch.isin(before, torch.tensor(FORGET))
    assert torch.equal(after[kept], before[kept]) and not torch.isin(after, torch.tensor(FORGET)).any()
    probe_masked = feature_probe(masked, ds.test, FORGET, m.mean, m.std, CPU)
    probe_original = feature_probe(trained_digits.model, ds.test, FORGET, m.mean, m.std, CPU)
    assert probe_masked == probe_original and probe_masked.balanced_accuracy > 90


def test_methods_leave_the_global_random_state_alone(trained_digits):
    ds, m = trained_digits.dataset, trained_digits.manifest
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    B.bad_teacher(copy.deepcopy(trained_digits.model), "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std,
                  CPU, 0, B.BadTeacherConfig(inversion=TINY_INVERSION, min_steps=2, precision="fp32"))
    assert torch.equal(torch.rand(3), expected)


def test_run_uisps_reuses_a_handed_in_inversion_exactly(trained_digits):
    from core.uisps import run_uisps

    ds, m = trained_digits.dataset, trained_digits.manifest
    cfg = UnlearnConfig(inversion=TINY_INVERSION, steps=5, precision="fp32")
    retained = retained_data(ds, FORGET)
    a = run_uisps(copy.deepcopy(trained_digits.model), "smallcnn", retained, FORGET, m.mean, m.std, cfg, CPU)
    b = run_uisps(copy.deepcopy(trained_digits.model), "smallcnn", retained, FORGET, m.mean, m.std, cfg, CPU,
                  synthetic=a.synthetic)
    assert b.timings["inversion"] == 0.0 < a.timings["inversion"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="not inverted for these forget labels"):
        run_uisps(copy.deepcopy(trained_digits.model), "smallcnn", retained_data(ds, [3, 5, 7]), [3, 5, 7],
                  m.mean, m.std, cfg, CPU, synthetic=a.synthetic)


def test_bad_teacher_gets_the_default_uisps_pass_budget(trained_digits, monkeypatch):
    # a baseline held to a tenth of UISPS's steps, or its rate, would make UISPS look better than it is
    from core.architectures import unlearning_lr
    from core.uisps import resolve_steps

    rates = []
    set_lr = B.MaskedSGD.set_lr
    monkeypatch.setattr(B.MaskedSGD, "set_lr", lambda opt, lr: (rates.append(lr), set_lr(opt, lr))[1])
    ds, m = trained_digits.dataset, trained_digits.manifest
    retained, info = retained_data(ds, FORGET), {}
    B.bad_teacher(copy.deepcopy(trained_digits.model), "smallcnn", retained, FORGET, m.mean, m.std, CPU, 0,
                  B.BadTeacherConfig(inversion=TINY_INVERSION, precision="fp32"), info=info)
    assert info["steps"] == resolve_steps(UnlearnConfig(), len(retained.train)) == 350 == len(rates)
    assert rates[0] == unlearning_lr("smallcnn") and rates[-1] < 1e-3 * rates[0]  # the default pass's cosine


@pytest.mark.parametrize("name", ["finetune", "bad_teacher"])
def test_a_model_with_dropout_unlearns_the_same_for_a_seed_whatever_the_callers_random_state(trained_digits, name):
    # torchvision models draw their dropout from the global random state, which the caller owns
    ds, m = trained_digits.dataset, trained_digits.manifest

    def unlearned(caller_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(64, 10))  # BatchNorm: what the inversion matches
        model.eval()
        torch.manual_seed(caller_seed)
        out = B.METHODS[name].fn(model, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                                 **tiny_kwargs(name, ds))
        return out[3].weight.detach().clone()

    assert torch.equal(unlearned(1), unlearned(2))


@pytest.mark.parametrize("name", ["finetune", "amnesiac", "unsir"])
def test_min_steps_gives_a_baseline_uisps_s_budget_of_steps(trained_digits, digits_copy, monkeypatch, name):
    # rows with equal budgets: a baseline floored at UISPS's 350 steps must train that many, no fewer
    steps = []
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda opt, *a, **k: (steps.append(1), sgd_step(opt, *a, **k))[1])
    ds, m = trained_digits.dataset, trained_digits.manifest
    kwargs = tiny_kwargs(name, ds)
    kwargs["cfg"] = replace(kwargs["cfg"], min_steps=30)
    info: dict = {}
    B.METHODS[name].fn(digits_copy, "smallcnn", retained_data(ds, FORGET), FORGET, m.mean, m.std, CPU, 0,
                       info=info, **kwargs)
    assert len(steps) == info["steps"] == 30
