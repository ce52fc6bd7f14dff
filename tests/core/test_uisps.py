"""The unlearning pass: frozen elements, relabel reproducibility, zero-glance, end to end."""

import numpy as np
import pytest
import torch

from core.architectures import RELABEL_STREAM, RESET_BLOCKS_STREAM, seeded_model
from core.config import InversionConfig, UnlearnConfig
from core.data import retained_data
from core.device import Normalizer
from core.errors import ArchitectureError
from core.metrics import evaluate
from core.uisps import (
    dampen_parameters,
    feature_scrub_loss,
    random_model_soft_labels,
    reset_feature_blocks,
    reset_output_rows,
    run_uisps,
    scheduled_lr,
    stratified_subset,
    unlearning_pass,
    without_labels,
)

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


def test_relabel_without_forgotten_labels_puts_no_mass_on_them_and_keeps_the_rest_in_proportion():
    soft = random_model_soft_labels("smallcnn", 1, 10, torch.randn(6, 1, 8, 8), seed=0)
    kept = without_labels(soft, {2, 7})
    assert torch.equal(kept[:, [2, 7]], torch.zeros(6, 2))
    assert torch.allclose(kept.sum(1), torch.ones(6))
    others = [c for c in range(10) if c not in (2, 7)]
    ratio = kept[:, others] / soft[:, others]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one factor per row


def test_cosine_schedule_starts_at_the_rate_and_decays_to_near_zero_while_constant_stays():
    rates = [scheduled_lr("cosine", 0.03, step, 100) for step in range(100)]
    assert rates[0] == 0.03 and rates[-1] < 1e-4
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert {scheduled_lr("constant", 0.03, step, 100) for step in range(100)} == {0.03}


def test_the_paper_preset_is_the_literal_pass_and_fields_given_beside_it_win():
    from core.architectures import unlearning_lr

    paper = UnlearnConfig(preset="paper")
    assert (paper.min_steps, paper.synthetic_per_batch, paper.lr_schedule, paper.relabel_exclude_forgotten) == (
        1, 0, "constant", False)
    assert UnlearnConfig.model_validate({"preset": "paper", "min_steps": 40}).min_steps == 40
    default = UnlearnConfig()
    assert (default.min_steps, default.lr_schedule, default.relabel_exclude_forgotten) == (350, "cosine", True)
    assert unlearning_lr("resnet18", paper=True) == 0.002 and unlearning_lr("resnet18") == 0.03
    assert (paper.reset_head, default.reset_head, default.reset_blocks) == (False, True, 0)


def test_the_pass_follows_the_cosine_schedule_so_its_last_step_barely_moves_the_weights(trained_digits):
    import copy

    ds = trained_digits.dataset
    norm = Normalizer(trained_digits.manifest.mean, trained_digits.manifest.std, torch.device("cpu"))
    syn_x, soft = torch.randn(8, 1, 8, 8), torch.softmax(torch.randn(8, 10), 1)
    last_move = {}
    for schedule in ("constant", "cosine"):
        model = copy.deepcopy(trained_digits.model)
        weights = []

        def snapshot(_stage: str, _done: int, _total: int) -> None:
            weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

        cfg = FAST.model_copy(update={"steps": 12, "momentum": 0.0, "lr_schedule": schedule})
        unlearning_pass(model, retained_data(ds, [3]), syn_x, soft, {}, norm, cfg, lr=0.1, progress=snapshot)
        last_move[schedule] = (weights[-1] - weights[-2]).norm().item()
    assert 0 < last_move["cosine"] < 0.1 * last_move["constant"]


def test_fresh_models_of_one_seed_are_not_the_originals_starting_weights():
    # the Original trained with seed 0 starts from seeded_model(seed=0); the relabelling teacher and
    # the bad teacher's incompetent one, built with the same seed, must be other models
    from core.baselines import random_model

    x = torch.randn(4, 1, 8, 8)
    start = seeded_model("smallcnn", 1, 10, seed=0).eval()
    with torch.no_grad():
        as_if_start = torch.softmax(start(x), dim=1)
    assert not torch.allclose(random_model_soft_labels("smallcnn", 1, 10, x, seed=0), as_if_start)
    incompetent = random_model("smallcnn", 1, 10, 0, torch.device("cpu"))
    assert not torch.equal(incompetent.body[0][0].weight, start.body[0][0].weight)
    teacher = seeded_model("smallcnn", 1, 10, 0, RELABEL_STREAM)
    assert not torch.equal(incompetent.body[0][0].weight, teacher.body[0][0].weight)


def test_a_negative_seed_draws_its_streams_too():
    a, b = (seeded_model("smallcnn", 1, 10, seed=-3, stream=s).body[0][0].weight for s in (None, RESET_BLOCKS_STREAM))
    assert not torch.equal(a, b)


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


def test_dampening_multiplies_each_parameter_element_by_its_factor(digits_copy):
    before = {k: v.clone() for k, v in digits_copy.named_parameters()}
    name = next(iter(before))
    scale = {name: torch.ones_like(before[name])}
    scale[name].view(-1)[:3] = torch.tensor([0.0, 0.5, 0.25])
    shrunk = dampen_parameters(digits_copy, scale)
    after = dict(digits_copy.named_parameters())
    assert torch.equal(after[name].detach(), before[name] * scale[name])
    assert all(torch.equal(after[k].detach(), v) for k, v in before.items() if k != name)
    assert shrunk == pytest.approx(3 / sum(v.numel() for v in before.values()))


def test_feature_scrub_loss_is_zero_at_the_retained_mean_and_blind_to_feature_scale():
    real = torch.randn(6, 4)
    at_mean = torch.cat([real, real.mean(0, keepdim=True).repeat(2, 1)])
    assert feature_scrub_loss(at_mean, 6).item() == pytest.approx(0.0, abs=1e-6)
    away = torch.cat([real, torch.randn(2, 4) + 3.0])
    assert feature_scrub_loss(away, 6).item() > 0.1
    assert feature_scrub_loss(10 * away, 6).item() == pytest.approx(feature_scrub_loss(away, 6).item(), rel=1e-4)


def test_feature_scrub_pulls_the_synthetic_samples_features_onto_the_retained_mean(trained_digits, digits_copy):
    import copy

    ds, m = trained_digits.dataset, trained_digits.manifest
    norm = Normalizer(m.mean, m.std, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    syn_x = norm(ds.train.with_labels([3]).x[:16])  # stand-ins for D'_g: real 3s make the pull visible
    soft = without_labels(torch.softmax(torch.randn(16, 10, generator=gen), 1), {3})
    retained = retained_data(ds, [3])
    probe_x = norm(retained.train.x[:256])

    def distance_after(weight: float) -> float:
        model = copy.deepcopy(digits_copy)
        cfg = FAST.model_copy(update={"steps": 30, "feature_scrub": weight})
        unlearning_pass(model, retained, syn_x, soft, {}, norm, cfg, lr=0.05)
        model.eval()
        with torch.no_grad():
            return (model.features(syn_x) - model.features(probe_x).mean(0)).pow(2).sum(1).mean().item()

    assert distance_after(5.0) < 0.5 * distance_after(0.0)


def test_feature_scrub_needs_a_model_with_features_and_a_head(trained_digits):
    m = trained_digits.manifest
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = FAST.model_copy(update={"feature_scrub": 1.0})
    with pytest.raises(ArchitectureError, match="feature_scrub"):
        run_uisps(plain, "smallcnn", retained_data(trained_digits.dataset, [3]), [3], m.mean, m.std, cfg, torch.device("cpu"))


def test_a_pass_with_dampening_and_without_sps_shrinks_some_elements_and_freezes_none(trained_digits, digits_copy):
    m = trained_digits.manifest
    cfg = FAST.model_copy(update={"sps": False, "dampen": 2.0, "steps": 5})
    outcome = run_uisps(digits_copy, "smallcnn", retained_data(trained_digits.dataset, [3]), [3],
                        m.mean, m.std, cfg, torch.device("cpu"))
    assert 0 < outcome.dampened_fraction < 1
    assert outcome.frozen_fraction == 0.0
    assert "fisher" in outcome.timings  # the Fisher stage runs for dampening alone


def test_reset_head_gives_the_forgotten_rows_a_fresh_layers_values_and_leaves_the_others(digits_copy):
    before = {k: v.clone() for k, v in digits_copy.head.named_parameters()}
    reset = reset_output_rows(digits_copy, [3, 5], num_classes=10, seed=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        fresh = torch.nn.Linear(64, 10)
    for name in ("weight", "bias"):
        now, mask = getattr(digits_copy.head, name), reset[f"head.{name}"]
        assert torch.equal(now[[3, 5]], getattr(fresh, name)[[3, 5]])
        assert torch.equal(now[~mask], before[name][~mask])
        assert int(mask.sum()) == 2 * (64 if name == "weight" else 1)


def test_reset_rows_are_never_frozen_so_the_pass_moves_them(trained_digits, digits_copy):
    m = trained_digits.manifest
    cfg = FAST.model_copy(update={"alpha": 0.01, "steps": 5})  # reset_head by default; tiny alpha: SPS freezes most
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        fresh = torch.nn.Linear(64, 10)
    outcome = run_uisps(digits_copy, "smallcnn", retained_data(trained_digits.dataset, [3]), [3],
                        m.mean, m.std, cfg, torch.device("cpu"))
    assert outcome.head_reset and outcome.frozen_fraction > 0.5
    row = digits_copy.head.weight[3]
    # every element moved from its fresh value (SPS froze none of them), the bias too
    assert (row != fresh.weight[3]).all() and digits_copy.head.bias[3] != fresh.bias[3]
    assert row @ fresh.weight[3] > 0.5 * fresh.weight[3].norm() ** 2  # yet still mostly the fresh row


def test_reset_head_needs_a_final_layer_with_one_output_per_class(trained_digits):
    m = trained_digits.manifest
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 8), torch.nn.Flatten())
    cfg = FAST.model_copy(update={"reset_head": True, "sps": False})
    with pytest.raises(ArchitectureError, match="reset_head"):
        run_uisps(plain, "smallcnn", retained_data(trained_digits.dataset, [3]), [3], m.mean, m.std, cfg, torch.device("cpu"))


def test_by_default_a_model_without_a_final_linear_layer_skips_the_head_reset(trained_digits):
    m = trained_digits.manifest
    conv_head = torch.nn.Sequential(  # a classifier ending in a convolution, as torchvision's squeezenet
        torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 10, 6), torch.nn.Flatten())
    cfg = UnlearnConfig(inversion=InversionConfig(iterations=2, n_per_class=2), precision="fp32", steps=2)
    outcome = run_uisps(conv_head, "smallcnn", retained_data(trained_digits.dataset, [3]), [3], m.mean, m.std, cfg,
                        torch.device("cpu"))
    assert cfg.reset_head and not outcome.head_reset


def test_reset_blocks_gives_the_last_blocks_a_fresh_models_weights_and_statistics_and_leaves_the_rest(digits_copy):
    from core.architectures import build_model

    before = {k: v.clone() for k, v in digits_copy.state_dict().items()}
    reset = reset_feature_blocks(digits_copy, "smallcnn", 1, 10, n=1, seed=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([4, RESET_BLOCKS_STREAM]).generate_state(1)[0]))
        fresh = build_model("smallcnn", 1, 10).state_dict()
    initial = seeded_model("smallcnn", 1, 10, seed=4).state_dict()  # what training with seed 4 starts from
    assert not torch.equal(fresh["body.2.0.weight"], initial["body.2.0.weight"])  # not the seed's own init
    assert reset == {"body.2.0.weight", "body.2.1.weight", "body.2.1.bias"}
    for k, v in digits_copy.state_dict().items():
        if k.startswith("body.2."):  # weights and BatchNorm running statistics alike
            assert torch.equal(v, fresh[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_reset_blocks_are_never_frozen_so_the_pass_regrows_them(trained_digits, digits_copy):
    from core.architectures import build_model

    m = trained_digits.manifest
    cfg = FAST.model_copy(update={"alpha": 0.01, "steps": 5, "reset_blocks": 1})  # tiny alpha: SPS freezes most
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, RESET_BLOCKS_STREAM]).generate_state(1)[0]))
        fresh = build_model("smallcnn", 1, 10).body[2][0].weight
    first_block = digits_copy.body[0][0].weight.clone()
    outcome = run_uisps(digits_copy, "smallcnn", retained_data(trained_digits.dataset, [3]), [3],
                        m.mean, m.std, cfg, torch.device("cpu"))
    assert outcome.blocks_reset == 1
    total = sum(p.numel() for p in digits_copy.parameters())
    outside = total - sum(p.numel() for p in digits_copy.body[2].parameters())
    assert 0 < outcome.frozen_fraction <= outside / total  # the reset block counts as free, not as absent
    moved = digits_copy.body[2][0].weight
    assert (moved != fresh).float().mean() > 0.9  # nearly every element moved: none frozen ...
    assert torch.nn.functional.cosine_similarity(moved.flatten(), fresh.flatten(), dim=0) > 0.5  # ... from the fresh values
    assert (digits_copy.body[0][0].weight == first_block).float().mean() > 0.5  # SPS still guards the layers below


@pytest.mark.parametrize("blocks", [3, 4])
def test_resetting_every_feature_block_is_refused_before_any_work(trained_digits, digits_copy, blocks):
    m = trained_digits.manifest
    cfg = FAST.model_copy(update={"reset_blocks": blocks})
    with pytest.raises(ArchitectureError, match="the model has 3 feature blocks"):
        run_uisps(digits_copy, "smallcnn", retained_data(trained_digits.dataset, [3]), [3], m.mean, m.std, cfg,
                  torch.device("cpu"), progress=lambda *a: pytest.fail("work started"))


def test_a_class_the_data_no_longer_holds_is_forgotten_and_reported_unmeasured(trained_digits, digits_copy):
    # the owner already deleted digit 3's samples: the case zero-glance unlearning is for
    from dataclasses import replace

    from core.workflow import unlearn_model

    full = trained_digits.dataset
    without_3 = replace(full, train=full.train.without_labels([3]), test=full.test.without_labels([3]))

    result = unlearn_model(digits_copy, trained_digits.manifest, without_3, [3], FAST, torch.device("cpu"))

    after = result.report["after"]
    assert (after["acc_forget"], after["mia"], after["forget_histogram"]) == (None, None, [])
    assert after["acc_retain"] >= result.report["before"]["acc_retain"] - 3.0
    assert result.manifest.forgotten_labels == [3]
    # measured on the full data, the unlearned model has forgotten digit 3 all the same
    assert evaluate(result.model, full, [3], trained_digits.manifest.mean, trained_digits.manifest.std,
                    torch.device("cpu")).acc_forget <= 1.0


def test_epochs_equivalent_counts_the_retained_samples_a_pass_holds():
    from core.uisps import epochs_of_retained

    mixed = UnlearnConfig()  # 16 synthetic samples in every batch of 128: 112 retained ones
    assert epochs_of_retained(mixed, 350, 45_000, 32) == pytest.approx(350 * 112 / 45_000)
    shuffled_in = UnlearnConfig(preset="paper")  # one pool of retained and synthetic samples
    assert epochs_of_retained(shuffled_in, 352, 45_000, 32) == pytest.approx(352 * 128 / 45_032)
