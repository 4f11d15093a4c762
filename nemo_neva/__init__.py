"""nemo_neva: NeVA (LLaVA-style vision-language model) as a NeMo plugin on megatron-core.

Importing the package registers its namespace with NeMo's config-target allow-list (at once if NeMo is loaded,
else when it loads), so NeMo's generic `ModelPT.restore_from` can rebuild a `MegatronNevaModel` from a `.nemo`.
The import itself is cheap: `MegatronNevaModel` and `build_model` (torch, NeMo, megatron-core) load on first use
(PEP 562).
"""
from nemo_neva.compat.mcore_range import check_megatron_core

check_megatron_core()  # one line naming the fix, before anything imports megatron-core (cheap: package metadata)

from nemo_neva.registration import register_when_nemo_loads  # noqa: E402

register_when_nemo_loads()

__all__ = ["MegatronNevaModel", "build_model"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "MegatronNevaModel":
        from nemo_neva.models.neva_model import MegatronNevaModel

        return MegatronNevaModel
    if name == "build_model":
        from nemo_neva.models.build import build_model

        return build_model
    raise AttributeError(f"module 'nemo_neva' has no attribute {name!r}")
