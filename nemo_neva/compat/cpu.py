"""The one place where megatron-core (0.16.1 - 0.19.x) is taught to run without CUDA.

megatron-core assumes CUDA in a few known spots: rotary embeddings and
schedules call `torch.cuda.current_device()`, the checkpoint writer calls `torch.cuda.synchronize()`,
pipeline schedules / p2p build tensors with `device="cuda"`, and the RNG tracker uses CUDA generators.
0.19 adds `torch.cuda.current_stream()` in DDP's gradient sync.
Everything here is a no-op when CUDA is available, so the GPU path runs megatron-core untouched.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def install() -> None:
    """Answer CUDA device queries with the CPU (idempotent; only when CUDA is absent)."""
    global _INSTALLED
    if _INSTALLED or not cuda_absent():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core's activation recompute (tensor_parallel.checkpoint) saves the CUDA generator state;
    # there is none: an empty state (its restore is a queued no-op without CUDA). The CPU generator and
    # the model-parallel tracker states are saved/restored by megatron-core as usual.
    torch.cuda.random.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    # megatron-core 0.19's DDP grad sync waits on the current stream for CUDA-graph events: the CPU has one
    # stream, whose waits torch.cpu.Stream answers as no-ops.
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    _INSTALLED = True


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaDeviceToCPU(TorchFunctionMode):
    """Rewrites `device="cuda"` arguments (and `.cuda()` calls) to the CPU for the code run inside it.

    Also reports CPU tensor type strings as their CUDA names, because megatron-core's optimizer and
    gradient clipping assert on them. Used only around megatron-core entry points that hard-code CUDA
    (pipeline schedules, p2p, optimizer construction and step, dist-checkpoint save) so the rest of the
    program pays no dispatch overhead.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizer asserts type strings such as 'torch.cuda.FloatTensor'.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_free():
    """Context in which megatron-core's hard-coded CUDA tensor placements land on the CPU."""
    if not cuda_absent():
        yield
        return
    install()
    with CudaDeviceToCPU():
        yield


@contextlib.contextmanager
def cuda_free_paused():
    """Inside a `cuda_free()` region, run the enclosed code without its TorchFunctionMode.

    For the model's own forward within megatron-core's schedule: it asks for no CUDA placement that the
    `install()` patches do not already answer, and the mode would route each of its thousands of torch
    calls through Python. A no-op when the innermost torch-function mode is not ours (e.g. on GPU).
    """
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if not isinstance(_get_current_function_mode(), CudaDeviceToCPU):
        yield
        return
    with _pop_mode_temporarily():
        yield


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CPURNGStatesTracker(CudaRNGStatesTracker):
        """megatron-core's named RNG-state tracker backed by the CPU generator.

        Keeps TP semantics: the model-parallel state differs per TP rank, so dropout inside
        tensor-parallel regions differs across TP ranks exactly as on GPU.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch plus megatron-core's model-parallel RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if not cuda_absent():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = _cpu_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    # Same offsets as megatron-core's model_parallel_cuda_manual_seed, so CPU and GPU runs agree in structure.
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
