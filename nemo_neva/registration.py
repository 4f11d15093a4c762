"""Registration with NeMo 3: its only plugin mechanism is the config-target allow-list."""
from __future__ import annotations

NAMESPACE = "nemo_neva.models."


def register_with_nemo() -> None:
    """Allow exactly our model namespace as a NeMo config `target` (idempotent, nothing broader)."""
    from nemo.core.classes import common

    if NAMESPACE not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(NAMESPACE)
