"""Test dependencies the package metadata does not require (the Makefile installs them by hand: tritonclient,
Megatron-Energon, NeMo-Run, webdataset, ...): skip where they are absent, but fail under NEVA_REQUIRE_OPTIONAL=1.

CI (.ci/run) sets the switch, so a broken install shows as failures, never as a quietly shorter green run.
tests/test_optional_switch.py checks that every skip in the suite goes through here or says on its line why it is
not a missing dependency (`# not optional: ...`).
"""
import importlib
import os

import pytest

SWITCH = "NEVA_REQUIRE_OPTIONAL"


def missing(reason: str, also: tuple = (), main_switch: bool = True):
    """Skip for `reason` (also at module level), or fail when NEVA_REQUIRE_OPTIONAL=1 or a switch in `also` is set
    (NEVA_REQUIRE_BROWSER keeps its own meaning for the chromium tests). `main_switch=False`: only the switches in
    `also` count (the vLLM venv, which `make test-vllm` builds after CI's `make test`)."""
    on = [name for name in ((SWITCH,) if main_switch else ()) + tuple(also) if os.environ.get(name) == "1"]
    if on:
        pytest.fail(f"{on[0]}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, install: str = "make install"):
    """`import module` and return it; missing -> `missing()` naming the module and what installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"{module} is not importable ({err}); `{install}` installs it")


def require_gpu_library(module: str, install: str = "pip install -e .[gpu]"):
    """A GPU-only library (Transformer Engine): without CUDA its absence is expected and always skips, because CI
    runs on CPU; on a CUDA machine the switch applies as for any optional dependency."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        reason = f"{module} is not importable ({err}); `{install}` installs it on a GPU machine"
        import torch

        if not torch.cuda.is_available():
            pytest.skip(reason, allow_module_level=True)
        missing(reason)
