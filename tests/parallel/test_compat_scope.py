"""The CPU compat mode (nemo_neva.compat.cpu) is paused around the model forward inside the schedule."""
import inspect

import pytest
import torch
from torch.overrides import _get_current_function_mode

from nemo_neva.compat.cpu import CudaDeviceToCPU, cuda_free, cuda_free_paused
from nemo_neva.training.schedule import _without_compat_mode

# not optional: a CPU-only mode
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the compat mode exists only without CUDA")


def test_paused_region_runs_without_the_mode_and_restores_it():
    with cuda_free():
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with cuda_free_paused():
            assert not isinstance(_get_current_function_mode(), CudaDeviceToCPU)
            with pytest.raises((RuntimeError, AssertionError)):  # a real CUDA request fails again
                torch.zeros(1, device="cuda")
        assert isinstance(_get_current_function_mode(), CudaDeviceToCPU)
        assert torch.ones(2, device="cuda").device.type == "cpu"
    with cuda_free_paused():  # outside cuda_free: a no-op
        assert _get_current_function_mode() is None


def test_forward_step_wrapper_pauses_the_mode_and_keeps_the_signature():
    seen = []

    def forward_step(data_iterator, model):
        seen.append(_get_current_function_mode())
        return next(data_iterator) * model, None

    wrapped = _without_compat_mode(forward_step)
    assert list(inspect.signature(wrapped).parameters) == ["data_iterator", "model"]
    with cuda_free():
        out, _ = wrapped(iter([torch.tensor(2.0)]), 3.0)
    assert float(out) == 6.0 and seen == [None]
