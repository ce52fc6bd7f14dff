"""Which device a job runs on: core.device.pick_device."""

from __future__ import annotations

import pytest
import torch

from core.device import pick_device
from core.errors import DeviceUnavailable


def test_auto_and_cpu_always_work() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_gpu_this_machine_lacks_is_a_clear_error() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = "cuda" if count == 0 else f"cuda:{count}"
    with pytest.raises(DeviceUnavailable, match=f"device '{name}': this machine has"):
        pick_device(name)


@pytest.mark.parametrize(("name", "message"), [("gpu", "unknown device 'gpu'"), ("meta", "not supported")])
def test_other_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(DeviceUnavailable, match=message):
        pick_device(name)


def test_training_with_dropout_is_reproducible_by_its_seed_whatever_the_callers_random_state() -> None:
    # torchvision models (VGG, MobileNet, EfficientNet) draw their dropout from the global state
    from core.config import TrainConfig
    from core.data import Split
    from core.device import Normalizer
    from core.training import train

    data = Split(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.arange(64) % 2)
    config = TrainConfig(epochs=2, batch_size=16, precision="fp32", augment=False)

    def trained(caller_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
        torch.manual_seed(caller_seed)
        train(model, data, Normalizer([0.5], [0.25], torch.device("cpu")), config, flip=False)
        after = torch.rand(1)  # the caller's state goes on as if training had drawn nothing
        torch.manual_seed(caller_seed)
        assert torch.equal(after, torch.rand(1))
        return model[2].weight.detach().clone()

    assert torch.equal(trained(1), trained(2))


def test_auto_precision_on_the_cpu_is_bf16_only_where_the_cpu_computes_in_bf16(monkeypatch) -> None:
    # an AVX-512 CPU without AVX512-BF16 or AMX emulates bf16, slower than fp32: auto stays fp32 there
    from core.device import use_bf16

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
        assert use_bf16("auto", cpu) is expected
        assert use_bf16("fp32", cpu) is False and use_bf16("bf16", cpu) is True


@pytest.mark.parametrize("arm_bf16", [True, False])
def test_auto_precision_on_an_arm_cpu_follows_its_bf16_extension(monkeypatch, arm_bf16: bool) -> None:
    # the x86 checks say no on Arm; oneDNN's flag there is the CPU's own BF16 extension (Graviton3, Neoverse V1)
    import platform

    from core.device import use_bf16

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: arm_bf16, raising=False)

    assert use_bf16("auto", torch.device("cpu")) is arm_bf16
