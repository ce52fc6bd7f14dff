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
