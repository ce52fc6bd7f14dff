"""Architectures by name, with input channels and class count from the data."""

import re

import pytest
import torch

from core.architectures import build_model, check_architecture, check_input_shape, feature_blocks, model_skeleton
from core.errors import ArchitectureError


@pytest.mark.parametrize("arch, channels, size", [
    ("resnet18", 3, 32), ("allcnn", 3, 32), ("smallcnn", 1, 8), ("torchvision:resnet18", 1, 32),
])
def test_architectures_map_the_data_to_class_logits(arch, channels, size):
    model = build_model(arch, channels, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_resnet18_has_the_cifar_stem():
    model = build_model("resnet18", 3, 10)
    stem = model.body[0][0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_allcnn_has_96_and_192_filters_with_batchnorm():
    convs = [m for m in build_model("allcnn", 3, 10).modules() if isinstance(m, torch.nn.Conv2d)]
    assert {c.out_channels for c in convs} == {96, 192}
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("allcnn", 3, 10).modules()) == len(convs)


@pytest.mark.parametrize("arch", ["vgg99", "torchvision:not_a_model", "torchvision:"])
def test_unknown_architectures_are_clear_errors(arch):
    with pytest.raises(ArchitectureError):
        build_model(arch, 3, 10)


@pytest.mark.parametrize("arch, blocks, last", [("smallcnn", 3, "body.2"), ("allcnn", 8, "body.7"), ("resnet18", 9, "body.8")])
def test_feature_blocks_are_the_bodys_parametrised_children_in_order(arch, blocks, last):
    found = feature_blocks(build_model(arch, 3, 10))
    assert len(found) == blocks and found[-1][0] == last  # the pooling layer holds no parameters


def test_a_torchvision_model_has_no_feature_blocks_to_reset():
    with pytest.raises(ArchitectureError, match="reset_blocks"):
        feature_blocks(build_model("torchvision:resnet18", 3, 10))


@pytest.mark.parametrize("arch", ["resnet18", "torchvision:resnet18", "torchvision:regnet_y_400mf"])
def test_a_skeleton_has_the_real_models_tensors_and_no_storage(arch):
    # RegNet's constructor reads tensor values, which meta tensors cannot give: built for real, then moved.
    skeleton = model_skeleton(arch, 3, 10)
    real = build_model(arch, 3, 10)

    layout = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}
    assert layout == {name: (tuple(t.shape), t.dtype) for name, t in real.state_dict().items()}
    assert {t.device.type for t in skeleton.state_dict().values()} == {"meta"}


@pytest.mark.parametrize(
    "arch, shape", [("resnet18", [3, 32, 32]), ("smallcnn", [1, 8, 8]), ("torchvision:resnet18", [1, 64, 64])]
)
def test_an_input_the_architecture_takes_passes_the_shape_check(arch, shape):
    check_input_shape(arch, shape, 10)


@pytest.mark.parametrize(
    "arch, shape, message",
    [
        ("torchvision:inception_v3", [3, 8, 8], "cannot take inputs of shape [3, 8, 8]"),  # pooled past 1x1
        ("torchvision:vit_b_16", [3, 32, 32], "Expected 224"),
        ("torchvision:googlenet", [3, 224, 224], "answers GoogLeNetOutputs when training"),  # auxiliary heads
    ],
)
def test_an_input_the_architecture_cannot_take_is_refused_before_any_job(arch, shape, message):
    with pytest.raises(ArchitectureError, match=re.escape(message)):
        check_input_shape(arch, shape, 10)


@pytest.mark.parametrize("arch", ["torchvision:squeezenet1_0", "torchvision:alexnet"])
def test_an_architecture_without_batchnorm_statistics_is_refused_at_registration(arch):
    # UISPS synthesises the forgotten classes from BatchNorm statistics: every job would fail.
    with pytest.raises(ArchitectureError, match="no BatchNorm layer"):
        check_architecture(arch, 3, 10, max_parameters=None)
    check_architecture("torchvision:resnet18", 3, 10, max_parameters=None)


def test_a_regnet_skeleton_being_built_holds_up_no_other_architecture(monkeypatch):
    # One tenant registering huge RegNets must not make every other registration wait behind it.
    import threading

    from torchvision.models import regnet

    inside, release = threading.Event(), threading.Event()
    real_init = regnet.RegNet.__init__

    def parked_init(self, *args, **kwargs):
        inside.set()
        assert release.wait(60)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(regnet.RegNet, "__init__", parked_init)
    model_skeleton.cache_clear()  # both must be built here, not found in the cache
    built: dict[str, object] = {}
    regnet_build = threading.Thread(target=lambda: built.update(regnet=model_skeleton("torchvision:regnet_y_400mf", 3, 13)))
    regnet_build.start()
    try:
        assert inside.wait(60)
        other = threading.Thread(target=lambda: built.update(resnet=model_skeleton("resnet18", 3, 13)))
        other.start()
        other.join(30)
        assert not other.is_alive() and "resnet" in built  # built while the RegNet was mid-build
    finally:
        release.set()
        regnet_build.join(60)
        model_skeleton.cache_clear()  # built under this test's patch of RegNet: later tests build their own
    assert {t.device.type for t in built["regnet"].state_dict().values()} == {"meta"}
