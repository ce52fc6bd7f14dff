"""Data-free inversion: BN statistics, target classes, entropy subset, batched == per-label."""

import pytest
import torch
import torch.nn.functional as F

from core.architectures import batchnorm_layers
from core.config import InversionConfig
from core.errors import ArchitectureError
from core.inversion import BatchNormStatistics, entropy, group_moments, invert


def test_group_moments_equal_direct_biased_statistics():
    x = torch.randn(6, 4, 5, 5)
    mean, var = group_moments(x, groups=2)
    for g, part in enumerate(x.split(3)):
        assert torch.allclose(mean[g], part.mean(dim=(0, 2, 3)), atol=1e-6)
        assert torch.allclose(var[g], part.var(dim=(0, 2, 3), unbiased=False), atol=1e-6)


def test_group_moments_of_bf16_activations_match_float64_in_either_memory_format():
    x = (torch.randn(8, 16, 6, 6) * 3 + 2).to(torch.bfloat16)  # a mean of 2 against a spread of 3
    ref = x.double().reshape(2, 4, 16, 36)
    for layout in (x, x.to(memory_format=torch.channels_last)):
        mean, var = group_moments(layout, groups=2)
        assert mean.dtype == var.dtype == torch.float32
        assert torch.allclose(mean.double(), ref.mean(dim=(1, 3)), atol=1e-5)
        assert torch.allclose(var.double(), ref.var(dim=(1, 3), unbiased=False), rtol=1e-5, atol=1e-5)


def test_bn_hook_loss_equals_direct_computation_from_layer_inputs(trained_digits):
    model = trained_digits.model
    x = torch.randn(8, 1, 8, 8)
    inputs = {}
    handles = [bn.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].detach()))
               for bn in batchnorm_layers(model)]
    stats = BatchNormStatistics(model, groups=1)
    model(x)
    hooked = stats.pop_loss()
    stats.remove()
    for h in handles:
        h.remove()
    direct = sum(
        torch.linalg.vector_norm(i.mean(dim=(0, 2, 3)) - bn.running_mean)
        + torch.linalg.vector_norm(i.var(dim=(0, 2, 3), unbiased=False) - bn.running_var)
        for bn, i in inputs.items()
    )
    assert len(inputs) == 3
    assert torch.allclose(hooked, direct, rtol=1e-5)


@pytest.fixture(scope="module")
def synthetic(trained_digits):
    cfg = InversionConfig(iterations=300)
    return invert(trained_digits.model, [3, 7], (1, 8, 8), cfg, seed=0)


def test_inverted_samples_are_classified_as_their_target_labels(trained_digits, synthetic):
    with torch.no_grad():
        pred = trained_digits.model(synthetic.x).argmax(1)
    assert (pred == synthetic.y).float().mean() >= 0.95
    assert synthetic.y.tolist() == [3] * 32 + [7] * 32


def test_entropy_subset_ends_with_higher_entropy_than_the_rest(trained_digits, synthetic):
    with torch.no_grad():
        h = entropy(trained_digits.model(synthetic.x))
    assert synthetic.entropy_subset.sum() == 32  # half of each class's 32
    assert h[synthetic.entropy_subset].mean() > 1.3 * h[~synthetic.entropy_subset].mean()


def test_entropy_sign_minus_lowers_the_subset_entropy(trained_digits):
    cfg = InversionConfig(iterations=300, entropy_sign=-1)
    syn = invert(trained_digits.model, [3], (1, 8, 8), cfg, seed=0)
    with torch.no_grad():
        h = entropy(trained_digits.model(syn.x))
    assert h[syn.entropy_subset].mean() <= h[~syn.entropy_subset].mean()


def test_batched_inversion_equals_one_run_per_label(trained_digits):
    cfg = InversionConfig(iterations=50, n_per_class=8)
    together = invert(trained_digits.model, [2, 5], (1, 8, 8), cfg, seed=1)
    apart = invert(trained_digits.model, [2, 5], (1, 8, 8), cfg.model_copy(update={"batched": False}), seed=1)
    assert torch.equal(together.y, apart.y)
    assert torch.allclose(together.x, apart.x, atol=1e-4)


def test_inversion_keeps_the_model_unchanged(trained_digits):
    before = {k: v.clone() for k, v in trained_digits.model.state_dict().items()}
    invert(trained_digits.model, [1], (1, 8, 8), InversionConfig(iterations=5), seed=0)
    after = trained_digits.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_entropy_of_one_hot_logits_is_finite():
    logits = torch.tensor([[0.0, -1e9, -1e9]])
    assert torch.isfinite(entropy(logits)).all()
    assert F.softmax(logits, 1)[0, 0] == 1


def test_a_model_without_batchnorm_statistics_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    with pytest.raises(ArchitectureError, match="no BatchNorm layer"):
        invert(model, [3], (1, 8, 8), InversionConfig(iterations=2, n_per_class=2), 0)
