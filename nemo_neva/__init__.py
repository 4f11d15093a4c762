"""nemo_neva: NeVA (LLaVA-style vision-language model) as a NeMo plugin on megatron-core.

Importing the package registers its namespace with NeMo's config-target allow-list, so NeMo's generic
`ModelPT.restore_from` can rebuild a `MegatronNevaModel` from a `.nemo`.
"""
from nemo_neva.compat.mcore_range import check_megatron_core

check_megatron_core()  # one line naming the fix, before anything imports megatron-core

from nemo_neva.registration import register_with_nemo  # noqa: E402

register_with_nemo()

from nemo_neva.models.neva_model import MegatronNevaModel  # noqa: E402

__all__ = ["MegatronNevaModel"]
__version__ = "0.1.0"
