"""Fisher diagonal (eq. 9), global min-max normalisation (eq. 11) and selection (eq. 12)."""

import torch

from core.architectures import build_model
from core.fisher import (
    dampening_scale,
    expected_fisher_diagonal,
    fisher_diagonal,
    fisher_diagonal_loop,
    frozen_fraction,
    minmax_normalize,
    suppression_mask,
)


def _tiny_model_with_running_statistics(classes: int) -> torch.nn.Module:
    model = build_model("smallcnn", 1, classes).eval()
    for bn in model.modules():  # non-trivial running statistics
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def test_vmap_fisher_equals_a_per_sample_loop_on_a_tiny_model():
    torch.manual_seed(0)
    model = _tiny_model_with_running_statistics(classes=4)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,))
    fast = fisher_diagonal(model, x, y, chunk=3)
    slow = fisher_diagonal_loop(model, x, y)
    assert fast.keys() == slow.keys()
    for k in fast:
        assert torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-10), k


def test_the_true_fisher_weighs_every_label_by_the_model_s_probability_of_it():
    torch.manual_seed(0)
    model = _tiny_model_with_running_statistics(classes=4)
    x = torch.randn(5, 1, 8, 8)
    probs = torch.softmax(model(x), 1).detach()
    # one sample and one label at a time, by the per-sample loop
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(len(x)):
        for label in range(4):
            one = fisher_diagonal_loop(model, x[i : i + 1], torch.tensor([label]))
            for k in expected:
                expected[k] += probs[i, label] * one[k] / len(x)

    got = expected_fisher_diagonal(model, x, num_classes=4, chunk=2)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-10), k


def test_fisher_is_not_the_square_of_the_batch_gradient():
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 3).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    fisher = fisher_diagonal(model, x, y)
    logp = torch.log_softmax(model(x), 1).gather(1, y[:, None]).mean()
    batch_sq = torch.autograd.grad(logp, model.head.weight)[0].pow(2)
    assert not torch.allclose(fisher["head.weight"], batch_sq)


def test_minmax_normalisation_is_global_over_all_parameters():
    f = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([5.0])}
    n = minmax_normalize(f)
    assert n["a"].tolist() == [0.0, 0.5] and n["b"].tolist() == [1.0]


def test_selection_freezes_where_retain_importance_exceeds_alpha_times_forget():
    retain = {"w": torch.tensor([0.0, 0.5, 0.9, 1.0])}
    forget = {"w": torch.tensor([0.0, 0.2, 0.8, 1.0])}
    mask = suppression_mask(retain, forget, alpha=1.5)
    # normalised: r = [0, .5, .9, 1], g = [0, .2, .8, 1]: 0.5 > 0.3 only
    assert mask["w"].tolist() == [False, True, False, False]
    assert frozen_fraction(mask) == 0.25


def test_dampening_shrinks_only_elements_far_more_important_to_the_forgotten_classes():
    retain = {"w": torch.tensor([0.0, 0.1, 0.5, 1.0])}
    forget = {"w": torch.tensor([0.0, 0.8, 0.6, 1.0])}
    scale = dampening_scale(retain, forget, dampen=2.0)
    # normalised: r = [0, .1, .5, 1], g = [0, .8, .6, 1]: only .8 > 2 * .1, scaled by 2 * .1 / .8
    assert torch.allclose(scale["w"], torch.tensor([1.0, 0.25, 1.0, 1.0]))
