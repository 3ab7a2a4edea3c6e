"""deeprnn.device: a device that exists, or a clear error; never a silent fallback."""

from __future__ import annotations

import random

import pytest
import torch

from deeprnn.device import DeviceUnavailableError, describe, resolve_device, seed_everything

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu"


@no_cuda
def test_auto_is_cpu_without_accelerators() -> None:
    if torch.backends.mps.is_available():
        pytest.skip("Apple MPS is available here")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_helpful_error(name: str) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device(name)
    msg = str(info.value)
    assert repr(name) in msg and "no usable CUDA GPU" in msg
    assert "--device cpu" in msg  # says what to do instead


def test_mps_when_absent() -> None:
    if torch.backends.mps.is_available():
        pytest.skip("Apple MPS is available here")
    with pytest.raises(DeviceUnavailableError, match="mps"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["tpu", "gpu", "CPU", ""])
def test_unknown_device(name: str) -> None:
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        resolve_device(name)


def test_seed_everything(restore_global_random: None) -> None:
    seed_everything(123)
    a = (random.random(), torch.rand(3))
    seed_everything(123)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
