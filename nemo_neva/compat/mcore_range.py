"""The megatron-core versions this package is tested on (pyproject.toml states the same bounds).

megatron-core changes its internals between minor releases (0.19 builds MLP specs as partials, adds CUDA
stream calls to DDP): a version outside the tested range fails here with one line naming the fix, not
later inside a training step.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

MIN_VERSION = "0.16.1"  # inclusive
MAX_VERSION = "0.20"  # exclusive
REQUIREMENT = f"megatron-core>={MIN_VERSION},<{MAX_VERSION}"


class UnsupportedMegatronCore(RuntimeError):
    pass


def check_megatron_core(found: str | None = None) -> str:
    """Raise `UnsupportedMegatronCore` unless `found` (default: the installed version) is in the range."""
    if found is None:
        try:
            found = version("megatron-core")
        except PackageNotFoundError:
            raise UnsupportedMegatronCore(f"megatron-core is not installed; pip install '{REQUIREMENT}'") from None
    if not Version(MIN_VERSION) <= Version(found) < Version(MAX_VERSION):
        raise UnsupportedMegatronCore(
            f"nemo_neva is tested with {REQUIREMENT}, found megatron-core {found}; pip install '{REQUIREMENT}'")
    return found
